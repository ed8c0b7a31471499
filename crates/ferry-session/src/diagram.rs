//! docs/session.md, generated from the transition table: a diagram per
//! role (mermaid) and the rows in words. A test keeps the file equal to
//! what [`render`] makes of [`ROWS`](crate::ROWS), so the docs cannot
//! drift from the code (`FERRY_BLESS=1 cargo test -p ferry-session` rewrites it).

use std::fmt::Write as _;

use crate::rows::ROWS;
use crate::state::{Effect, Found, On, Outcome, Role};

fn event(on: On) -> String {
    match on {
        On::Resolved(o) => format!("resolved: {}", o.name()),
        On::Restarted(Found::Any) => "restart".into(),
        On::Restarted(f) => format!("restart, VM {}", found(f)),
        other => snake(&format!("{other:?}")),
    }
}

fn found(f: Found) -> &'static str {
    match f {
        Found::Any => "any",
        Found::Gone => "gone",
        Found::Running => "running",
        Found::MigrationCompleted => "migrated",
    }
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn effects(list: &[Effect]) -> String {
    list.iter().map(|e| snake(&format!("{e:?}"))).collect::<Vec<_>>().join(", ")
}

fn outcome(o: Option<Outcome>) -> String {
    o.map(|o| snake(&format!("{o:?}"))).unwrap_or_default()
}

/// The whole of docs/session.md.
pub fn render() -> String {
    let mut s = String::from(
        "# The migration session's states\n\n\
         Generated from `crates/ferry-session/src/rows.rs` by a test \
         (`FERRY_BLESS=1 cargo test -p ferry-session` rewrites it): do not edit by hand.\n\
         Each side of a migration keeps a durable record whose state changes only along these \
         arrows; the restart arrows are what a restarted agent does with what it finds. \
         [protocol.md](protocol.md) explains the messages behind each event.\n",
    );
    for (role, title) in [(Role::Source, "Source"), (Role::Destination, "Destination")] {
        let _ = write!(s, "\n## {title}\n\n```mermaid\nstateDiagram-v2\n    [*] --> preparing\n");
        for (r, from, on, to, _, _) in ROWS.iter().filter(|row| row.0 == role) {
            let _ = r;
            let _ = writeln!(s, "    {} --> {}: {}", from.name(), to.name(), event(*on));
        }
        for end in ["completed", "aborted", "postcopy_lost"] {
            let _ = writeln!(s, "    {end} --> [*]");
        }
        s.push_str("```\n\n| from | event | to | what happens to the VM | audit record |\n|---|---|---|---|---|\n");
        for (_, from, on, to, fx, out) in ROWS.iter().filter(|row| row.0 == role) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                from.name(),
                event(*on),
                to.name(),
                effects(fx),
                outcome(*out)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn docs_session_md_is_generated_from_the_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/session.md");
        let want = super::render();
        if std::env::var_os("FERRY_BLESS").is_some() {
            std::fs::write(path, &want).expect("write docs/session.md");
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/session.md differs from the transition table: run \
             `FERRY_BLESS=1 cargo test -p ferry-session` and commit the result"
        );
    }
}
