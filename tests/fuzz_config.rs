//! Property-based fuzzing of the configuration surface: every parser and the TOML file path
//! take arbitrary input without panicking, and every rejection is one clear line naming what
//! was wrong. Bounded for CI (proptest's default cases); for a longer run:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_config`.

use corepool::balance::Mode;
use corepool::cgroup::CpuReport;
use corepool::config::{
    self, Instances, RestartPolicy, format_duration, parse_duration, parse_host,
    parse_metrics_addr, parse_port, parse_size,
};
use corepool::logs::LogFormat;
use corepool::signals::parse_signal;
use proptest::prelude::*;

fn one_line(result: Result<impl Sized, String>) -> Result<(), TestCaseError> {
    if let Err(message) = result {
        prop_assert!(!message.is_empty());
        prop_assert!(!message.contains('\n'), "multi-line error: {message:?}");
    }
    Ok(())
}

fn cpu() -> CpuReport {
    CpuReport {
        usable: 2,
        online: 2,
        affinity: 2,
        quota: None,
    }
}

/// Strings that look like values: digits, units, signs, dots, letters, spaces, unicode.
fn valueish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{0,25}(\\.[0-9]{0,5})?(ms|s|m|h|min|B|K|Ki|KiB|M|Mi|MiB|G|Gi|GiB|T|Ti|x|)",
        "-?[0-9]{0,6}",
        "(SIG)?[A-Za-z]{0,8}",
        "\\PC{0,40}",
        "\\[?[0-9a-f:.]{0,40}\\]?(:[0-9]{0,6})?",
    ]
}

proptest! {
    #[test]
    fn parsers_never_panic_and_errors_are_one_line(text in valueish()) {
        one_line(parse_duration(&text))?;
        one_line(parse_size(&text))?;
        one_line(Instances::parse(&text))?;
        one_line(parse_signal(&text).map(|_| ()))?;
        one_line(parse_metrics_addr(&text))?;
        one_line(parse_host(&text))?;
        one_line(parse_port(&text))?;
        one_line(LogFormat::parse(&text))?;
        one_line(Mode::parse(&text))?;
        one_line(RestartPolicy::parse(&text))?;
        one_line(config::parse_log_level(&text).map(|_| ()))?;
        one_line(config::parse_bool(&text))?;
        one_line(config::parse_optional_size(&text))?;
        one_line(corepool::user::parse_user(&text))?;
    }

    #[test]
    fn durations_round_trip(ms in 0u64..10_000_000_000) {
        let d = std::time::Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }

    #[test]
    fn sizes_are_exact(n in 0u64..1_000_000, unit in prop::sample::select(vec![("", 1u64), ("K", 1000), ("Ki", 1024), ("MiB", 1 << 20), ("G", 1_000_000_000)])) {
        prop_assert_eq!(parse_size(&format!("{n}{}", unit.0)), Ok(n * unit.1));
    }

    #[test]
    fn config_files_never_panic(lines in prop::collection::vec(
        prop_oneof![
            (prop::sample::select(config::OPTIONS.iter().map(|o| o.key).chain(["command", "bogus", "kill-timeout"]).collect::<Vec<_>>()), valueish())
                .prop_map(|(k, v)| format!("{k} = {v:?}")),
            (prop::sample::select(config::OPTIONS.iter().map(|o| o.key).collect::<Vec<_>>()), -100i64..100000)
                .prop_map(|(k, v)| format!("{k} = {v}")),
            "\\PC{0,30}",
            Just("command = [\"node\", 1]".to_string()),
            Just("[table]".to_string()),
        ],
        0..8,
    )) {
        let text = lines.join("\n");
        match config::from_file_text("fuzz.toml", &text, cpu()) {
            Ok(config) => prop_assert!(config.instances >= 1 || text.contains("instances")),
            Err(err) => {
                prop_assert!(!err.message.contains('\n'), "multi-line: {:?}", err.message);
                let named = err.message.starts_with("fuzz.toml:") || err.message.starts_with("invalid value for fuzz.toml:") || err.message.contains("COREPOOL_") || err.message.contains("WEB_CONCURRENCY") || err.message.contains("PORT");
                prop_assert!(named, "error does not name the file: {:?}", err.message);
            }
        }
    }
}
