//! Every `ferry` command line shown in README.md's "Using it" and in
//! docs/deploy.md parses with the real command tree: a renamed flag or
//! subcommand cannot leave the docs behind.

use clap::Parser;
use ferry_cli::Cli;

const README: &str = include_str!("../../../README.md");
const DEPLOY: &str = include_str!("../../../docs/deploy.md");

/// The shell code blocks of a markdown text, continuation lines joined.
fn shell_lines(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_block = !in_block && line.starts_with("```sh");
            continue;
        }
        if !in_block {
            continue;
        }
        pending.push_str(line.trim_end().trim_end_matches('\\'));
        if line.trim_end().ends_with('\\') {
            pending.push(' ');
        } else {
            out.push(std::mem::take(&mut pending));
        }
    }
    out
}

/// Words of one command, quotes removed; stops at a comment or redirection.
fn words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    for c in command.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (None, '#' | '>') if word.is_empty() => break,
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            (None, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The `ferry ...` commands of some markdown, placeholders filled in.
fn ferry_commands(markdown: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in shell_lines(markdown) {
        for part in line.split([';', '&', '|']) {
            let part = part.trim().trim_start_matches("nohup ");
            if !part.starts_with("ferry ") {
                continue;
            }
            let w: Vec<String> = words(part)
                .into_iter()
                .map(|w| match w.as_str() {
                    "ID" => "019ac0b2-6b8e-7c3a-9d1e-2f3a4b5c6d7e".to_owned(),
                    "$HOST" => "host1".to_owned(),
                    _ => w,
                })
                .collect();
            out.push(w);
        }
    }
    out
}

fn check(name: &str, markdown: &str, at_least: usize) {
    // Operator commands take it from the environment, as the docs say.
    std::env::set_var("FERRY_CLIENT_CONFIG", "client.toml");
    let commands = ferry_commands(markdown);
    assert!(commands.len() >= at_least, "{name}: only {} ferry commands found", commands.len());
    for c in commands {
        if let Err(e) = Cli::try_parse_from(&c) {
            panic!("{name}: `{}` does not parse:\n{e}", c.join(" "));
        }
    }
}

#[test]
fn the_readme_commands_parse() {
    check("README.md", README, 20);
}

#[test]
fn the_deploy_guide_commands_parse() {
    check("docs/deploy.md", DEPLOY, 15);
}

#[test]
fn every_exit_status_is_in_the_readme_and_the_help() {
    let flat = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let (readme, help) = (flat(README), flat(ferry_cli::EXIT_STATUS_HELP));
    let denied = "3 `ferry policy explain`: the request is denied";
    for s in ["0 success", "1 error", "2 usage", denied, "4 the migration is in doubt"] {
        assert!(readme.contains(s), "README lacks exit status {s:?}");
    }
    for s in ["0 success", "1 error", "2 usage", denied, "4 a migration is in doubt"] {
        assert!(help.contains(s), "ferry --help lacks exit status {s:?}");
    }
}
