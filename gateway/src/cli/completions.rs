//! Shell completions and man pages, generated from the clap definitions so they never drift
//! from the commands: `postern completions bash|zsh|fish` prints a script on stdout;
//! `postern man DIR` writes `postern.1` and one page per subcommand (`postern-ops-list.1`, …).

use clap::ValueEnum;
use endpoint_types::ApiError;
use std::path::{Path, PathBuf};

/// A shell `postern completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    /// bash: source it, or put it in /usr/share/bash-completion/completions/postern.
    Bash,
    /// zsh: put it as `_postern` in a directory of $fpath.
    Zsh,
    /// fish: put it in ~/.config/fish/completions/postern.fish.
    Fish,
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, mut cmd: clap::Command, out: &mut dyn std::io::Write) {
    let name = cmd.get_name().to_string();
    match shell {
        Shell::Bash => clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, name, out),
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, name, out),
        Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, name, out),
    }
}

/// Writes the man pages of `cmd` and its subcommands into `dir` (created if missing); returns
/// the files written, sorted.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, ApiError> {
    let failed = |e: std::io::Error| {
        ApiError::invalid(format!("cannot write man pages to {}: {e}", dir.display()))
            .hint("give a directory you can write to")
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    clap_mangen::generate_to(cmd, dir).map_err(failed)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(failed)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every (sub)command, with the path that leads to it, that has no help
    /// text; positional and flag alike, `--help`/`--version` aside.
    fn args_without_help(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(format!("{path} {} (the command)", sub.get_name()));
            }
            args_without_help(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn every_command_and_argument_has_help_text() {
        let mut cmd = crate::cli::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        args_without_help(&cmd, "postern", &mut missing);
        assert!(
            missing.is_empty(),
            "without help text:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn completion_scripts_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(shell, crate::cli::Cli::command(), &mut out);
            let script = String::from_utf8(out).unwrap_or_default();
            for word in [
                "server",
                "completions",
                "ops",
                "list",
                "log-format",
                "wait-timeout",
            ] {
                assert!(script.contains(word), "{shell:?} script lacks {word}");
            }
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().join("man1");
        let pages = man_pages(crate::cli::Cli::command(), &dir).unwrap();
        let names: Vec<String> = pages
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        for page in [
            "postern.1",
            "postern-server.1",
            "postern-ops-list.1",
            "postern-completions.1",
        ] {
            assert!(
                names.iter().any(|n| n == page),
                "{page} missing from {names:?}"
            );
        }
        let server = std::fs::read_to_string(dir.join("postern-server.1")).unwrap();
        assert!(server.contains("metrics"), "{server}");
    }
}
