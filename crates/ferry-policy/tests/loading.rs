//! Loading, checking and reloading: broken files are refused with their
//! place, and a refused reload leaves the old policy deciding.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use ferry_policy::{check_files, Action, PolicyEngine, PolicyError, SharedPolicy, SCHEMA};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

const GOOD: &str = r#"@id("allow-admins")
permit (principal is Operator, action == Action::"MigrateVm", resource is Vm)
when { principal.roles.contains("admin") };
"#;

#[test]
fn example_files_check_clean() {
    let s = check_files(&example_policies(), Some(&example_entities())).expect("check");
    assert_eq!(s.policies.len(), 11);
    assert_eq!(s.entities, Some(5));
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let text = s.to_string();
    assert!(text.starts_with("ok: 1 file(s), 11 policies (5 permit, 6 forbid)"), "{text}");
    assert!(text.contains("forbid anti-co-location"), "{text}");
    assert!(text.contains("forbid resident-anti-co-location"), "{text}");
}

#[test]
fn entity_hosts_lists_the_hosts_only() {
    let hosts = ferry_policy::entity_hosts(&example_entities()).expect("hosts");
    assert_eq!(hosts, ["host-a", "host-b", "host-c"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write(dir.path(), "bad.json", r#"[{"uid":{"type":"Host","id":"h"},"attrs":{}}]"#);
    assert!(ferry_policy::entity_hosts(&bad).is_err(), "schema violations are refused");
}

#[test]
fn shipped_schema_matches_embedded_schema() {
    let shipped = std::fs::read_to_string(docs().join("ferry.cedarschema")).expect("read");
    assert_eq!(shipped, SCHEMA, "docs/policy/ferry.cedarschema drifted from the embedded schema");
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Line 3 misses the comma between action and resource.
    let bad = write(
        dir.path(),
        "bad.cedar",
        "// a comment\n@id(\"x\")\npermit (principal, action resource);\n",
    );
    let err = check_files(std::slice::from_ref(&bad), None).expect_err("syntax error");
    match &err {
        PolicyError::Syntax { path, line, column, .. } => {
            assert_eq!(path, &bad);
            assert_eq!(*line, 3, "{err}");
            assert!(*column > 1, "{err}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(shown.starts_with(&format!("{}:3:", bad.display())), "{shown}");
    println!("{shown}");
}

#[test]
fn schema_violations_are_refused_with_their_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(dir.path(), "good.cedar", GOOD);
    // Unknown attribute `rolez`, on line 4 of the second file.
    let bad = write(
        dir.path(),
        "typo.cedar",
        "\n@id(\"typo\")\npermit (principal is Operator, action == Action::\"MigrateVm\", resource)\nwhen { principal.rolez.contains(\"admin\") };\n",
    );
    let err = check_files(&[good.clone(), bad.clone()], None).expect_err("unknown attribute");
    match &err {
        PolicyError::Validation { path, line, policy, .. } => {
            assert_eq!(path, &bad);
            assert_eq!(*line, 4, "{err}");
            assert_eq!(policy, "typo");
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    println!("{err}");

    // Unknown action.
    let bad = write(
        dir.path(),
        "action.cedar",
        "permit (principal, action == Action::\"DeleteVm\", resource);\n",
    );
    let err = check_files(&[bad], None).expect_err("unknown action");
    assert!(matches!(err, PolicyError::Validation { line: 1, .. }), "{err}");
    assert!(err.to_string().contains("action.cedar#0"), "fallback id names the file: {err}");

    // Comparing a string with a number.
    let bad = write(
        dir.path(),
        "types.cedar",
        "permit (principal is Host, action == Action::\"SendVm\", resource is Vm)\nwhen { principal.zone > 1 };\n",
    );
    let err = check_files(&[bad], None).expect_err("type error");
    assert!(matches!(err, PolicyError::Validation { line: 2, .. }), "{err}");
}

#[test]
fn duplicate_ids_and_templates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = write(dir.path(), "a.cedar", GOOD);
    let b = write(dir.path(), "b.cedar", GOOD);
    let err = check_files(&[a, b.clone()], None).expect_err("duplicate");
    assert!(
        matches!(&err, PolicyError::DuplicateId { id, path, .. } if id == "allow-admins" && path == &b),
        "{err}"
    );

    let t = write(dir.path(), "t.cedar", "permit (principal == ?principal, action, resource);\n");
    let err = check_files(&[t], None).expect_err("template");
    assert!(matches!(err, PolicyError::Template { .. }), "{err}");
}

#[test]
fn bad_entities_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = write(
        dir.path(),
        "extra.json",
        r#"[{"uid":{"type":"Host","id":"h"},"attrs":{"zone":"z","trust_level":1,"owner":"x"},"parents":[]}]"#,
    );
    let err = PolicyEngine::load(&example_policies(), &extra).expect_err("unknown attribute");
    assert!(matches!(err, PolicyError::Entities { .. }), "{err}");
    assert!(err.to_string().contains("owner"), "{err}");
    println!("{err}");

    let wrong = write(
        dir.path(),
        "wrong.json",
        r#"[{"uid":{"type":"Host","id":"h"},"attrs":{"zone":"z","trust_level":"high"},"parents":[]}]"#,
    );
    assert!(PolicyEngine::load(&example_policies(), &wrong).is_err());

    let broken = write(dir.path(), "broken.json", "[\n  {\"uid\": }\n]\n");
    let err = PolicyEngine::load(&example_policies(), &broken).expect_err("json");
    assert!(matches!(err, PolicyError::Entities { location: Some((2, _)), .. }), "{err}");

    let err =
        PolicyEngine::load(&example_policies(), &dir.path().join("missing.json")).expect_err("io");
    assert!(matches!(err, PolicyError::Io { .. }), "{err}");
}

#[test]
fn broken_reload_keeps_the_old_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = SharedPolicy::new(example_engine());
    let allowed = request(operator("bob", "operator"), Action::MigrateVm, labels("green", 0));
    let before = shared.current();
    assert!(before.authorize(&allowed).is_allow());

    // A syntax error, and separately a schema violation: both refused.
    let broken = write(dir.path(), "broken.cedar", "permit (principal, action, resource)\n");
    assert!(matches!(
        shared.reload(&[broken], &example_entities()),
        Err(PolicyError::Syntax { .. })
    ));
    let invalid = write(
        dir.path(),
        "invalid.cedar",
        "forbid (principal, action, resource) when { resource.colour == \"red\" };\n",
    );
    assert!(matches!(
        shared.reload(&[invalid], &example_entities()),
        Err(PolicyError::Validation { .. })
    ));
    // The engine in force is the very same one, deciding the same way.
    assert!(Arc::ptr_eq(&before, &shared.current()));
    assert!(shared.current().authorize(&allowed).is_allow());

    // A good reload takes effect; readers holding the old Arc keep it.
    let admins_only = write(dir.path(), "admins.cedar", GOOD);
    shared.reload(&[admins_only], &example_entities()).expect("reload");
    assert!(!shared.current().authorize(&allowed).is_allow());
    assert!(before.authorize(&allowed).is_allow());
}

#[test]
fn absurdly_nested_policy_is_refused_not_a_stack_overflow() {
    // Found by fuzzing: Cedar's parser recurses per bracket and overflowed
    // the stack (aborting the process) at a few thousand levels.
    let dir = tempfile::tempdir().expect("tempdir");
    let deep = format!(
        "@id(\"deep\")\npermit (principal, action, resource)\nwhen {{ {}true{} }};\n",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    let p = write(dir.path(), "deep.cedar", &deep);
    match check_files(&[p], None) {
        Err(PolicyError::Syntax { line, message, .. }) => {
            assert_eq!(line, 3);
            assert!(message.contains("nest deeper than"), "{message}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    // At the limit Cedar still parses on a test thread's 2 MiB stack.
    let at_limit = format!(
        "@id(\"ok\")\npermit (principal, action, resource)\nwhen {{ {}true{} }};\n",
        "(".repeat(47),
        ")".repeat(47)
    );
    let p = write(dir.path(), "limit.cedar", &at_limit);
    check_files(&[p], None).expect("47 parentheses inside one when block");
    // Brackets inside strings and comments do not count.
    let quoted = format!("// {}\n{GOOD}@id(\"s\")\nforbid (principal, action, resource) when {{ \"{}\" == \"\" }};\n", "(".repeat(100), "[".repeat(100));
    let p = write(dir.path(), "quoted.cedar", &quoted);
    check_files(&[p], None).expect("brackets in comments and strings are not nesting");
}

#[test]
fn deep_nesting_without_brackets_loads_on_a_small_stack() {
    // 3,000 nested if-then-else: no brackets, so not refused, and parsed
    // on the loader's own large stack, not this 2 MiB test thread's.
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "@id(\"ifs\")\npermit (principal, action, resource)\nwhen {{ {}true{} }};\n",
        "if true then ".repeat(3000),
        " else false".repeat(3000)
    );
    let p = write(dir.path(), "ifs.cedar", &text);
    let s = check_files(&[p], None).expect("a deep but valid policy loads");
    assert_eq!(s.policies.len(), 1);
}
