//! Small helpers of the command line: parsing durations, ids and `K=V`
//! pairs; formatting times, sizes, bytes and tables.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use impetus_proto::ids::{JobId, PeerId, Timestamp};

/// Parse a duration: a number with a unit `ms`, `s`, `m` or `h`; a plain
/// number is milliseconds. Fractions are allowed (`1.5s`). Returns ms.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration (examples: 500ms, 2s, 1m, 1h; a plain number is milliseconds)".into());
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let invalid = || format!("invalid duration {text:?} (examples: 500ms, 2s, 1.5m, 1h)");
    if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') || num.ends_with('.') {
        return Err(invalid());
    }
    let factor: f64 = match unit.trim() {
        "" | "ms" => 1.0,
        "s" | "sec" | "secs" => 1_000.0,
        "m" | "min" | "mins" => 60_000.0,
        "h" | "hr" | "hrs" => 3_600_000.0,
        "d" | "day" | "days" => 86_400_000.0,
        other => {
            return Err(format!("unknown unit {other:?} in duration {text:?} (use ms, s, m, h or d)"));
        }
    };
    let value: f64 = num.parse().map_err(|_| invalid())?;
    let ms = (value * factor).round();
    if !ms.is_finite() || ms > u64::MAX as f64 / 2.0 {
        return Err(format!("duration {text:?} is too large"));
    }
    Ok(ms as u64)
}

/// clap value parser for durations, as a [`Duration`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_duration_ms(text).map(Duration::from_millis)
}

/// A job id: `job-12` or `12`.
pub fn parse_job_id(text: &str) -> Result<JobId, String> {
    let t = text.trim();
    let digits = t.strip_prefix("job-").unwrap_or(t);
    digits.parse::<u64>().map(JobId).map_err(|_| format!("invalid job id {text:?} (expected job-N or N)"))
}

/// A peer id: `peer-3` or `3`.
pub fn parse_peer_id(text: &str) -> Result<PeerId, String> {
    let t = text.trim();
    let digits = t.strip_prefix("peer-").unwrap_or(t);
    digits.parse::<u64>().map(PeerId).map_err(|_| format!("invalid peer id {text:?} (expected peer-N or N)"))
}

/// An environment variable `K=V` (the value may be empty or hold `=`).
pub fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("invalid environment variable {text:?}: expected KEY=VALUE")),
    }
}

/// A limit that may be lifted: `none`/`unlimited`/`0` is `OrNone(None)`.
/// (A newtype: clap reads `Option<Option<T>>` as a flag with an optional value.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrNone<T>(pub Option<T>);

/// `none`/`unlimited`/`0` → no limit, else a positive number.
pub fn parse_optional_u64(text: &str) -> Result<OrNone<u64>, String> {
    match text.trim() {
        "none" | "unlimited" | "0" => Ok(OrNone(None)),
        t => t
            .parse::<u64>()
            .map(|n| OrNone(Some(n)))
            .map_err(|_| format!("invalid number {text:?} (or `none` for no limit)")),
    }
}

/// `none`/`forever` → no limit, else a duration in milliseconds.
pub fn parse_optional_duration_ms(text: &str) -> Result<OrNone<u64>, String> {
    match text.trim() {
        "none" | "forever" => Ok(OrNone(None)),
        t => parse_duration_ms(t).map(|ms| OrNone(Some(ms))).map_err(|e| format!("{e} (or `none` to keep)")),
    }
}

/// Like [`parse_optional_u64`], for u32.
pub fn parse_optional_u32(text: &str) -> Result<OrNone<u32>, String> {
    match parse_optional_u64(text)?.0 {
        None => Ok(OrNone(None)),
        Some(n) => {
            u32::try_from(n).map(|n| OrNone(Some(n))).map_err(|_| format!("{n} is too large (at most {})", u32::MAX))
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A duration for humans: `850ms`, `2.5s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let tenths = ms / 100;
        if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        }
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1_000) % 60)
    } else if ms < 86_400_000 {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    } else {
        format!("{}d{:02}h", ms / 86_400_000, (ms / 3_600_000) % 24)
    }
}

/// A timestamp as UTC `YYYY-MM-DD HH:MM:SS.mmm`.
pub fn human_time(t: Timestamp) -> String {
    let ms = t.0;
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z", rem / 3600, (rem / 60) % 60, rem % 60, ms % 1000)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// How long ago `t` was, for humans (`-` if it is in the future or unset).
pub fn age(t: Timestamp, now_ms: u64) -> String {
    if t.0 == 0 || t.0 > now_ms {
        return "-".into();
    }
    human_ms(now_ms - t.0)
}

/// Bytes as text: UTF-8 as is, else base64 with a marker.
pub fn bytes_for_humans(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => format!("(binary, {} bytes, base64) {}", b.len(), b64(b)),
    }
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Put bytes into a JSON object under `key` (UTF-8 text) or `key_b64`.
pub fn json_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, key: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => {
            obj.insert(key.to_owned(), serde_json::Value::String(s.to_owned()));
        }
        Err(_) => {
            obj.insert(format!("{key}_b64"), serde_json::Value::String(b64(b)));
        }
    }
}

/// The first line of some bytes, shortened to `max` characters, for a table cell.
pub fn snippet(b: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(b);
    let line = text.trim_end().lines().next().unwrap_or("");
    let mut out: String = line.chars().take(max).collect();
    if line.chars().count() > max || text.trim_end().lines().nth(1).is_some() {
        out.push('…');
    }
    out
}

/// A plain text table: columns padded to the widest cell, numbers right-aligned.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|h| (*h).to_owned()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let numeric = |i: usize| {
            !self.rows.is_empty()
                && self.rows.iter().all(|r| {
                    r.get(i).is_some_and(|c| c == "-" || c.chars().next().is_some_and(|ch| ch.is_ascii_digit()))
                })
        };
        let right: Vec<bool> = (0..n).map(numeric).collect();
        let line = |cells: &[String]| {
            let mut s = String::new();
            for i in 0..n {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = width[i].saturating_sub(c.chars().count());
                if i > 0 {
                    s.push_str("  ");
                }
                if right[i] {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    if i + 1 < n {
                        s.push_str(&" ".repeat(pad));
                    }
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = line(&self.header);
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("250"), Ok(250));
        assert_eq!(parse_duration_ms("2s"), Ok(2_000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
        assert_eq!(parse_duration_ms("1m"), Ok(60_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms(" 3 s "), Ok(3_000));
        assert_eq!(parse_duration_ms("0"), Ok(0));
    }

    #[test]
    fn bad_durations_name_the_problem() {
        assert_eq!(
            parse_duration_ms("5x").unwrap_err(),
            "unknown unit \"x\" in duration \"5x\" (use ms, s, m, h or d)"
        );
        assert!(parse_duration_ms("").unwrap_err().contains("empty duration"));
        assert!(parse_duration_ms("s").unwrap_err().contains("invalid duration"));
        assert!(parse_duration_ms("1.2.3s").unwrap_err().contains("invalid duration"));
        assert!(parse_duration_ms("-1s").unwrap_err().contains("invalid duration"));
        assert!(parse_duration_ms("99999999999999999999h").unwrap_err().contains("too large"));
        assert_eq!(parse_duration_ms("7d"), Ok(7 * 86_400_000));
        assert_eq!(parse_optional_duration_ms("forever"), Ok(OrNone(None)));
        assert_eq!(parse_optional_duration_ms("none"), Ok(OrNone(None)));
        assert_eq!(parse_optional_duration_ms("1h"), Ok(OrNone(Some(3_600_000))));
        assert!(parse_optional_duration_ms("1y").unwrap_err().contains("or `none` to keep"));
    }

    #[test]
    fn ids_and_env_parse() {
        assert_eq!(parse_job_id("job-12"), Ok(JobId(12)));
        assert_eq!(parse_job_id("12"), Ok(JobId(12)));
        assert!(parse_job_id("job-x").unwrap_err().contains("expected job-N"));
        assert_eq!(parse_peer_id("peer-3"), Ok(PeerId(3)));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").unwrap_err().contains("KEY=VALUE"));
        assert_eq!(parse_optional_u64("none"), Ok(OrNone(None)));
        assert_eq!(parse_optional_u64("7"), Ok(OrNone(Some(7))));
        assert!(parse_optional_u32("99999999999").is_err());
    }

    #[test]
    fn human_formats() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(2_000), "2s");
        assert_eq!(human_ms(2_500), "2.5s");
        assert_eq!(human_ms(192_000), "3m12s");
        assert_eq!(human_ms(7_500_000), "2h05m");
        assert_eq!(human_time(Timestamp(0)), "1970-01-01 00:00:00.000Z");
        assert_eq!(human_time(Timestamp(1_709_653_334_633)), "2024-03-05 15:42:14.633Z");
        assert_eq!(age(Timestamp(1_000), 3_000), "2s");
        assert_eq!(age(Timestamp(5_000), 3_000), "-");
    }

    #[test]
    fn bytes_are_text_or_base64() {
        assert_eq!(bytes_for_humans(b"49\n"), "49\n");
        assert_eq!(bytes_for_humans(&[0xff, 0x00]), "(binary, 2 bytes, base64) /wA=");
        let mut m = serde_json::Map::new();
        json_bytes(&mut m, "result", b"ok");
        json_bytes(&mut m, "input", &[0xff]);
        assert_eq!(serde_json::Value::Object(m).to_string(), r#"{"input_b64":"/w==","result":"ok"}"#);
        assert_eq!(snippet(b"line1\nline2", 10), "line1…");
        assert_eq!(snippet(b"49\n", 10), "49");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["name", "queued"]);
        t.row(vec!["s1".into(), "5".into()]);
        t.row(vec!["longer".into(), "120".into()]);
        assert_eq!(t.render(), "name    queued\ns1           5\nlonger     120\n");
    }
}
