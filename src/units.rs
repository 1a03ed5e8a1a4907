//! Units: durations (`1500ms`, `10s`, `2m`) and sizes (`512MiB`, `1G`) as users write them,
//! read exactly and written back the same way. Shared by the configuration and by the log
//! lines of the supervisor, which must not depend on the configuration module to print a
//! duration.

use std::time::Duration;

/// Parses `--duration`-style values: `1500ms`, `10s`, `2m`, `1h`, `1.5s`, or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{t}' has no unit (write e.g. 1500ms, 10s, 2m)"))?;
    let (number, unit) = t.split_at(split);
    let bad = || format!("'{t}' is not a duration (write e.g. 1500ms, 10s, 2m)");
    let unit_ns: u128 = match unit.trim() {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(bad()),
    };
    // Exact decimal arithmetic (no floats): "5547061.685s" is exactly that many nanoseconds.
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') || fraction.len() > 9 {
        return Err(bad());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| bad())?
    };
    let nanos = whole
        .checked_mul(unit_ns)
        .and_then(|n| n.checked_add(fraction_value * unit_ns / 10u128.pow(fraction.len() as u32)))
        .filter(|&n| n <= 365 * 86_400 * 1_000_000_000)
        .ok_or_else(|| format!("'{t}' is longer than a year"))?;
    if !nanos.is_multiple_of(1_000_000) {
        return Err(format!("'{t}' is finer than a millisecond"));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses sizes: `512MiB`, `1G`, `300M`, `4096`. K, M, G, T are powers of 1000 and Ki/KiB, Mi/MiB,
/// Gi/GiB, Ti/TiB powers of 1024 (the Kubernetes convention); `B` may follow either.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("'{t}' is not a size (write e.g. 512MiB, 1G, 300M)");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    let scale: u64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(bad()),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("'{t}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1x", "-1s", "1..2s", "99999999999h", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
        for d in [0, 100, 1500, 10_000, 120_000, 7_200_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("300MB"), Ok(300_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "G",
            "1X",
            "-1G",
            "99999999999999999999",
            "18446744073709551615Ki",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should be rejected");
        }
    }
}
