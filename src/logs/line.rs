//! Formatting of one worker line in the raw, prefix or json format, with its exact size known
//! before its buffer is built; a worker's own JSON object is merged with corepool's fields.

use super::pump::Piece;
use super::{LogFormat, POOL_KEY, RESERVED_KEYS, SPLIT_MARK, Stream};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::time::SystemTime;

/// One worker line, parsed and ready to write: its exact size is known before any buffer for
/// it exists, so a pump can wait for budget while holding only the piece.
pub(super) struct WorkerLine<'a> {
    format: LogFormat,
    slot: usize,
    pid: i32,
    stream: Stream,
    piece: &'a Piece,
    /// JSON only: the timestamp and the worker's text as a message or as an object's members.
    ts: String,
    body: Body<'a>,
    /// The worker's pool, when the container runs several (else empty: not shown).
    pool: &'a str,
}

enum Body<'a> {
    /// Raw and prefix formats: the piece's bytes as they are.
    Bytes,
    /// A line that is not a JSON object: corepool's fields plus `"msg"`.
    Text(Cow<'a, str>),
    /// A JSON object: its members in order, values verbatim, keys renamed where they collide
    /// with corepool's.
    Members(Vec<(String, &'a RawValue)>),
}

impl<'a> WorkerLine<'a> {
    pub(super) fn new(
        format: LogFormat,
        slot: usize,
        pid: i32,
        stream: Stream,
        piece: &'a Piece,
        now: SystemTime,
    ) -> WorkerLine<'a> {
        let (ts, body) = match format {
            LogFormat::Raw | LogFormat::Prefix => (String::new(), Body::Bytes),
            LogFormat::Json => (rfc3339(now), json_body(&piece.bytes)),
        };
        WorkerLine {
            format,
            slot,
            pid,
            stream,
            piece,
            ts,
            body,
            pool: "",
        }
    }

    /// The line of a worker of pool `pool` (empty: no pool shown). A shown pool's name is
    /// corepool's `"pool"` member: the worker's own `pool` is renamed as the other reserved
    /// keys are.
    pub(super) fn in_pool(mut self, pool: &'a str) -> WorkerLine<'a> {
        self.pool = pool;
        if let (false, Body::Members(members)) = (pool.is_empty(), &mut self.body) {
            keep_apart(members, &[POOL_KEY]);
        }
        self
    }

    /// Bytes the line will take, newline included.
    pub(super) fn len(&self) -> usize {
        let mut count = Count(0);
        // Writing to a counter cannot fail.
        if let Body::Text(text) = &self.body {
            // The common case, counted without running the escaping twice.
            let _ = self.write_ours(&mut count);
            return count.0 + ",\"msg\":".len() + json_string_len(text) + "}\n".len();
        }
        let _ = self.write_to(&mut count);
        count.0
    }

    /// The line, in a buffer of exactly `len` bytes (from [`WorkerLine::len`]).
    pub(super) fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut line = Vec::with_capacity(len);
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut line);
        line
    }

    fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        match &self.body {
            Body::Bytes => {
                if self.format == LogFormat::Prefix {
                    if self.pool.is_empty() {
                        write!(out, "[{}:{}] ", self.slot, self.pid)?;
                    } else {
                        write!(out, "[{}/{}:{}] ", self.pool, self.slot, self.pid)?;
                    }
                }
                out.write_all(&self.piece.bytes)?;
                if self.piece.split {
                    out.write_all(SPLIT_MARK.as_bytes())?;
                }
            }
            Body::Text(text) => {
                self.write_ours(out)?;
                out.write_all(b",\"msg\":")?;
                serde_json::to_writer(&mut *out, text.as_ref())?;
                out.write_all(b"}")?;
            }
            Body::Members(members) => {
                self.write_ours(out)?;
                for (key, value) in members {
                    out.write_all(b",")?;
                    serde_json::to_writer(&mut *out, key)?;
                    out.write_all(b":")?;
                    out.write_all(value.get().as_bytes())?;
                }
                out.write_all(b"}")?;
            }
        }
        out.write_all(b"\n")
    }

    /// `{"ts":…,"worker":…,"pid":…,"stream":…[,"split":true]` (the object left open).
    fn write_ours(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        out.write_all(b"{\"ts\":")?;
        serde_json::to_writer(&mut *out, &self.ts)?;
        if !self.pool.is_empty() {
            write!(out, ",\"{POOL_KEY}\":")?;
            serde_json::to_writer(&mut *out, self.pool)?;
        }
        write!(
            out,
            ",\"worker\":{},\"pid\":{},\"stream\":\"{}\"",
            self.slot,
            self.pid,
            self.stream.name()
        )?;
        if self.piece.split {
            out.write_all(b",\"split\":true")?;
        }
        Ok(())
    }
}

/// Length of `text` as a JSON string, quotes included, escaped as serde_json escapes it:
/// `\"` `\\` `\b` `\t` `\n` `\f` `\r` in two bytes, other control bytes as `\u00XX`.
fn json_string_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | b'\t' | b'\n' | 0x0c | b'\r' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// An `io::Write` that only counts.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Formats one piece of worker output as a complete line, newline included.
pub fn format_worker_line(
    format: LogFormat,
    slot: usize,
    pid: i32,
    stream: Stream,
    piece: &Piece,
    now: SystemTime,
) -> Vec<u8> {
    let line = WorkerLine::new(format, slot, pid, stream, piece, now);
    line.to_bytes(line.len())
}

/// The JSON body of a worker line: its members when it is a JSON object (corepool's fields are
/// then merged in), else its text as `"msg"`.
///
/// corepool's fields win: a member of the worker's object named like one of
/// [`RESERVED_KEYS`] is kept under `app_<key>` (another `app_` in front while that name is
/// taken too, so no key is ever duplicated by the renaming). Other members keep their place
/// and their exact text.
fn json_body(text: &[u8]) -> Body<'_> {
    let trimmed = text.trim_ascii();
    if trimmed.starts_with(b"{")
        && let Ok(json) = std::str::from_utf8(trimmed)
        && let Ok(Members(mut members)) = serde_json::from_str::<Members>(json)
    {
        keep_apart(&mut members, &RESERVED_KEYS);
        return Body::Members(members);
    }
    Body::Text(String::from_utf8_lossy(text))
}

/// Renames each member of `members` named like one of `reserved` to `app_<key>` (another
/// `app_` in front while that name is taken too, so that no key is ever duplicated).
fn keep_apart(members: &mut [(String, &RawValue)], reserved: &[&str]) {
    if !members
        .iter()
        .any(|(key, _)| reserved.contains(&key.as_str()))
    {
        return;
    }
    let taken: std::collections::HashSet<String> =
        members.iter().map(|(key, _)| key.clone()).collect();
    for (key, _) in members.iter_mut() {
        if reserved.contains(&key.as_str()) {
            let mut renamed = format!("app_{key}");
            while taken.contains(&renamed) {
                renamed.insert_str(0, "app_");
            }
            *key = renamed;
        }
    }
}

/// A JSON object's members in their order, values as their raw text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// `2026-11-24T22:12:09.123Z` for a point in time.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}
