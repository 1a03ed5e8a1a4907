//! The one error that ends corepool before (or instead of) running the pool: a one-line message
//! and the exit code it ends with (see `exit`).
//!
//! Every start-up step, the configuration and the client subcommands return [`Fatal`];
//! `main` reports it once, as `corepool: MESSAGE` on stderr, and exits with its code. clap's
//! help and version texts travel the same way, to stdout with code 0.

use crate::exit;
use std::fmt;
use std::io::Write;

/// Where a [`Fatal`]'s text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// `corepool: MESSAGE` on stderr: a failure.
    Stderr,
    /// The text as it is, on stdout: help or version asked for.
    Stdout,
}

/// A one-line reason to stop, with the exit code it stops with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub code: i32,
    pub message: String,
    stream: Stream,
}

impl Fatal {
    pub fn new(code: i32, message: impl fmt::Display) -> Fatal {
        Fatal {
            code,
            message: message.to_string(),
            stream: Stream::Stderr,
        }
    }

    /// A usage or configuration mistake (flag, variable or file): exit code 2.
    pub fn usage(message: impl fmt::Display) -> Fatal {
        Fatal::new(exit::USAGE, message)
    }

    /// corepool could not set itself up: exit code 3.
    pub fn startup(message: impl fmt::Display) -> Fatal {
        Fatal::new(exit::STARTUP, message)
    }

    /// Text asked for (help, version): printed as it is on stdout, exit code 0.
    pub fn output(text: impl fmt::Display) -> Fatal {
        Fatal {
            code: 0,
            message: text.to_string(),
            stream: Stream::Stdout,
        }
    }

    /// The same failure with another exit code (`corepool health` knows only 0 and 1).
    pub fn with_code(self, code: i32) -> Fatal {
        Fatal { code, ..self }
    }

    /// clap's verdict: help and version to stdout with 0; a usage error is its first line,
    /// pointing at `--help`, and 2.
    pub fn from_clap(err: &clap::Error) -> Fatal {
        use clap::error::ErrorKind;
        match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Fatal::output(err.render()),
            _ => Fatal::usage(format_args!("{} (see corepool --help)", clap_line(err))),
        }
    }

    /// Writes the message where it belongs and gives the exit code.
    pub fn report(&self) -> i32 {
        let _ = match self.stream {
            Stream::Stderr => writeln!(std::io::stderr(), "corepool: {}", self.message),
            Stream::Stdout => std::io::stdout().write_all(self.message.as_bytes()),
        };
        self.code
    }
}

/// The first line of a clap error, without its `error: ` prefix.
pub fn clap_line(err: &clap::Error) -> String {
    let rendered = err.to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fatal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_text() {
        assert_eq!(Fatal::usage("x").code, exit::USAGE);
        assert_eq!(Fatal::startup("x").code, exit::STARTUP);
        assert_eq!(Fatal::usage("bad").with_code(1).code, 1);
        assert_eq!(Fatal::usage("bad").to_string(), "bad");
        // A command of its own (not config's: fatal sits below config).
        let command = || clap::Command::new("corepool").arg(clap::Arg::new("port").long("port"));
        let help = command()
            .try_get_matches_from(["corepool", "--help"])
            .unwrap_err();
        assert_eq!(Fatal::from_clap(&help).code, 0);
        let wrong = command()
            .try_get_matches_from(["corepool", "--no-such-flag"])
            .unwrap_err();
        let fatal = Fatal::from_clap(&wrong);
        assert_eq!(fatal.code, exit::USAGE);
        assert!(fatal.message.ends_with("(see corepool --help)"), "{fatal}");
        assert!(!fatal.message.contains('\n'));
    }
}
