//! Clap's own errors (unknown flag, missing argument, bad value), printed the way every other
//! error is: with `--output json` anywhere on the command line, one
//! `{"error":{"code":"INVALID_REQUEST","message","hint","details":{"usage":…}}}` document on
//! stdout; otherwise clap's text on stderr. Exit status 2 either way; `--help` and
//! `--version` print and exit 0.

use super::exit_codes;
use endpoint_types::{ApiError, ErrorEnvelope};
use std::process::ExitCode;

/// Whether the raw arguments ask for JSON output (`--output json` or `--output=json`; the
/// flag is global, so it may stand anywhere).
pub fn wants_json(args: &[String]) -> bool {
    args.iter().any(|a| a == "--output=json")
        || args
            .windows(2)
            .any(|w| matches!(w, [flag, value] if flag == "--output" && value == "json"))
}

/// The structured form of a clap error.
pub fn to_api_error(e: &clap::Error) -> ApiError {
    let rendered = e.render().to_string();
    // Clap's first paragraph, on one line ("… were not provided: --customer <CUSTOMER>").
    let message = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_string();
    ApiError::invalid(message)
        .hint("run `postern --help` (or `postern COMMAND --help`) for usage")
        .details(serde_json::json!({ "usage": rendered, "kind": format!("{:?}", e.kind()) }))
}

/// Prints `e` as asked and gives the exit status.
pub fn report(e: clap::Error, args: &[String]) -> ExitCode {
    let code = e.exit_code();
    if code == 0 || !wants_json(args) {
        let _ = e.print();
        return ExitCode::from(if code == 0 {
            exit_codes::OK
        } else {
            exit_codes::USAGE
        });
    }
    println!(
        "{}",
        serde_json::to_string(&ErrorEnvelope {
            error: to_api_error(&e)
        })
        .unwrap_or_default()
    );
    ExitCode::from(exit_codes::USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn json_is_asked_for_anywhere_on_the_line() {
        assert!(wants_json(&args("postern ops list --output json --bogus")));
        assert!(wants_json(&args("postern --output=json whoami")));
        assert!(!wants_json(&args("postern --output text whoami")));
        assert!(!wants_json(&args("postern whoami json")));
    }

    #[test]
    fn a_clap_error_becomes_invalid_request_with_the_usage() {
        let e = crate::cli::Cli::try_parse_from(args("postern --output json ops list --bogus"))
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let api = to_api_error(&e);
        assert_eq!(api.code, endpoint_types::ErrorCode::InvalidRequest);
        assert!(api.message.contains("--bogus"), "{}", api.message);
        let missing =
            crate::cli::Cli::try_parse_from(args("postern ops list --app shop")).unwrap_err();
        let api = to_api_error(&missing);
        assert!(
            api.message
                .ends_with("were not provided: --customer <CUSTOMER>"),
            "{}",
            api.message
        );
        assert!(api.details["usage"]
            .as_str()
            .unwrap_or_default()
            .contains("Usage"));
    }
}
