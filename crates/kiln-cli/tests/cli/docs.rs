//! `docs/cli.md` is generated from `kiln --help` and must match it.
//!
//! The part of the page above the marker line is written by hand; below it, every command's
//! `--help` output. Regenerate with `KILN_UPDATE_DOCS=1 cargo test -p kiln-cli --test cli docs`.

use std::path::PathBuf;

use crate::harness::Kiln;

const MARKER: &str =
    "<!-- Everything below is generated from `kiln --help`; do not edit by hand. -->";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md")
}

/// Every command path (`["apps", "create"]`, ...) by reading the `Commands:` sections of
/// `--help`, depth first, without `help`.
pub(crate) fn command_paths(kiln: &Kiln) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    collect(kiln, Vec::new(), &mut paths);
    paths
}

fn collect(kiln: &Kiln, path: Vec<String>, paths: &mut Vec<Vec<String>>) {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let help = kiln.run(&args).stdout;

    let children: Vec<String> = help
        .split("\nCommands:\n")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .filter_map(|line| line.split_whitespace().next())
                .filter(|name| *name != "help")
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();

    if !path.is_empty() {
        paths.push(path.clone());
    }
    for child in children {
        let mut child_path = path.clone();
        child_path.push(child);
        collect(kiln, child_path, paths);
    }
}

fn generate(kiln: &Kiln) -> String {
    let mut out = String::new();
    let mut all = vec![Vec::new()];
    all.extend(command_paths(kiln));
    for path in all {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let run = kiln.run(&args);
        run.ok();
        let title = if path.is_empty() {
            "kiln".to_owned()
        } else {
            format!("kiln {}", path.join(" "))
        };
        out.push_str(&format!(
            "\n## {title}\n\n```text\n{}\n```\n",
            run.stdout.trim_end()
        ));
    }
    out
}

#[test]
fn docs_cli_md_matches_help() {
    let kiln = Kiln::new();
    let generated = generate(&kiln);
    let path = doc_path();
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let (manual, _) = current.split_once(MARKER).unwrap_or((current.as_str(), ""));
    let expected = format!("{}{MARKER}\n{generated}", manual);

    if std::env::var_os("KILN_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &expected).unwrap();
        return;
    }
    assert!(
        current.contains(MARKER),
        "{} lacks the marker line; run KILN_UPDATE_DOCS=1 cargo test -p kiln-cli --test cli docs",
        path.display()
    );
    assert!(
        current == expected,
        "{} is out of date with `kiln --help`; run KILN_UPDATE_DOCS=1 cargo test -p kiln-cli --test cli docs",
        path.display()
    );
}
