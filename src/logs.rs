//! Logs: worker output and corepool's own messages, written a whole line at a time.
//!
//! Each worker's stdout and stderr are pipes read by a small async task (a *pump*) that cuts the
//! byte stream into lines and formats each one (`raw`, `prefix` or `json`). Finished lines go
//! through a bounded channel to one writer thread per output stream, the only code that writes
//! to corepool's fd 1 or fd 2. One writer per stream means lines from different workers never
//! interleave mid-line, whatever their length; a thread means a reader that stops reading our
//! stdout blocks only that thread (and, through the bounded channel, the workers' pipes), never
//! the supervisor loop, so signals and reaping go on. A line longer than [`MAX_LINE`] is cut
//! into pieces, each but the last marked as split, so memory stays bounded.
//!
//! corepool's own messages (tracing events) are formatted here too, in the same format, and sent
//! to the stderr writer without ever waiting: when that channel is full they are dropped rather
//! than stall PID 1.

use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Longest line passed on whole; longer ones are split into pieces of this size.
pub const MAX_LINE: usize = 256 * 1024;
/// Marker appended to every piece of a split line but the last (raw and prefix formats).
pub const SPLIT_MARK: &str = " [corepool: line split]";
/// Lines buffered per output stream before pumps wait (and workers' pipes fill up).
const CHANNEL_LINES: usize = 256;

/// How worker lines and corepool's messages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines exactly as the worker wrote them.
    Raw,
    /// `[<slot>:<pid>] ` before each line.
    Prefix,
    /// One JSON object per line: `{"ts","worker","pid","stream","msg"}`.
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Result<LogFormat, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "raw" => Ok(LogFormat::Raw),
            "prefix" => Ok(LogFormat::Prefix),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "'{other}' is not a log format (raw, prefix or json)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Raw => "raw",
            LogFormat::Prefix => "prefix",
            LogFormat::Json => "json",
        }
    }
}

/// Which of a worker's output streams a line came from (and which of ours it goes to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The two writer threads and the senders that feed them.
pub struct Output {
    pub format: LogFormat,
    stdout: mpsc::Sender<Vec<u8>>,
    stderr: mpsc::Sender<Vec<u8>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Output {
    /// Starts one writer thread for fd 1 and one for fd 2.
    pub fn start(format: LogFormat) -> std::io::Result<Output> {
        let (done_tx, done) = std::sync::mpsc::channel();
        let stdout = spawn_writer(1, "corepool-stdout", done_tx.clone())?;
        let stderr = spawn_writer(2, "corepool-stderr", done_tx)?;
        Ok(Output {
            format,
            stdout,
            stderr,
            done,
        })
    }

    /// Routes corepool's own tracing events to the stderr writer, in `format`.
    pub fn install_tracing(&self, level: tracing::level_filters::LevelFilter) {
        // A weak sender: the global subscriber must not keep the stderr writer open after
        // `finish`, or exit would wait out the whole grace period.
        let layer = EventLayer {
            format: self.format,
            sink: self.stderr.downgrade(),
        };
        // Only fails if a subscriber is already set (tests calling twice): keep the first.
        let _ = tracing_subscriber::registry()
            .with(level)
            .with(layer)
            .try_init();
    }

    /// Starts a pump for one of a worker's output pipes.
    pub fn pump(&self, pipe: OwnedFd, stream: Stream, slot: usize, pid: i32) -> PumpHandle {
        let sink = match stream {
            Stream::Stdout => self.stdout.clone(),
            Stream::Stderr => self.stderr.clone(),
        };
        let origin = Arc::new(Origin {
            format: self.format,
            stream,
            slot,
            pid,
        });
        PumpHandle(tokio::spawn(pump(pipe, origin, sink)))
    }

    /// Lets the writers drain what they hold and waits up to `grace` for them to finish; a
    /// writer blocked on a reader that never reads is abandoned, so exit is never held up.
    pub fn finish(self, grace: Duration) {
        let Output {
            stdout,
            stderr,
            done,
            ..
        } = self;
        drop(stdout);
        drop(stderr);
        let deadline = std::time::Instant::now() + grace;
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if done.recv_timeout(left).is_err() {
                break;
            }
        }
    }
}

/// A running pump; finished when the pipe reaches end of file (every writer closed it).
pub struct PumpHandle(tokio::task::JoinHandle<()>);

impl PumpHandle {
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Stops reading (used when a descendant keeps the pipe open after the pool has stopped).
    pub fn abort(&self) {
        self.0.abort()
    }
}

fn spawn_writer(
    fd: i32,
    name: &str,
    done: std::sync::mpsc::Sender<()>,
) -> std::io::Result<mpsc::Sender<Vec<u8>>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CHANNEL_LINES);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // SAFETY: fd 1 and fd 2 stay open for the life of the process; we only borrow them.
            let target = unsafe { BorrowedFd::borrow_raw(fd) };
            let mut broken = false;
            while let Some(line) = rx.blocking_recv() {
                if !broken && write_fully(target, &line).is_err() {
                    // A closed or failing stdout must not kill the pool: drop output from now on.
                    broken = true;
                }
            }
            let _ = done.send(());
        })?;
    Ok(tx)
}

/// Writes all of `bytes`, waiting for the fd to become writable if it is non-blocking.
fn write_fully(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Where a worker line came from: everything a formatted line needs besides its text.
struct Origin {
    format: LogFormat,
    stream: Stream,
    slot: usize,
    pid: i32,
}

async fn pump(pipe: OwnedFd, origin: Arc<Origin>, sink: mpsc::Sender<Vec<u8>>) {
    let raw = pipe.as_raw_fd();
    let mut reader = match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
        Ok(reader) => reader,
        Err(err) => {
            tracing::warn!(
                "cannot read worker {} {} (fd {raw}): {err}",
                origin.slot,
                origin.stream.name()
            );
            return;
        }
    };
    let mut framer = LineFramer::default();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::debug!(
                    "worker {} {} read error: {err}",
                    origin.slot,
                    origin.stream.name()
                );
                break;
            }
        };
        for piece in framer.push(&chunk[..n]) {
            if sink.send(origin.format_line(&piece)).await.is_err() {
                return;
            }
        }
    }
    if let Some(piece) = framer.finish() {
        let _ = sink.send(origin.format_line(&piece)).await;
    }
}

/// A piece of worker output ready to format: a whole line, or part of an over-long one.
#[derive(Debug, PartialEq, Eq)]
pub struct Piece {
    pub bytes: Vec<u8>,
    /// More of the same line follows (the line was longer than [`MAX_LINE`]).
    pub split: bool,
}

/// Cuts a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Default)]
pub struct LineFramer {
    pending: Vec<u8>,
}

impl LineFramer {
    /// Adds bytes; returns the pieces completed by them.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.pending.extend_from_slice(&window[..nl]);
                    out.push(Piece {
                        bytes: std::mem::take(&mut self.pending),
                        split: false,
                    });
                    bytes = &bytes[nl + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.pending.len() == MAX_LINE {
                        out.push(Piece {
                            bytes: std::mem::take(&mut self.pending),
                            split: true,
                        });
                    }
                }
            }
        }
        out
    }

    /// What is left at end of file: a last line without a newline, if any.
    pub fn finish(&mut self) -> Option<Piece> {
        if self.pending.is_empty() {
            None
        } else {
            Some(Piece {
                bytes: std::mem::take(&mut self.pending),
                split: false,
            })
        }
    }
}

impl Origin {
    fn format_line(&self, piece: &Piece) -> Vec<u8> {
        format_worker_line(
            self.format,
            self.slot,
            self.pid,
            self.stream,
            piece,
            SystemTime::now(),
        )
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
    let mut line = Vec::with_capacity(piece.bytes.len() + 64);
    match format {
        LogFormat::Raw | LogFormat::Prefix => {
            if format == LogFormat::Prefix {
                line.extend_from_slice(format!("[{slot}:{pid}] ").as_bytes());
            }
            line.extend_from_slice(&piece.bytes);
            if piece.split {
                line.extend_from_slice(SPLIT_MARK.as_bytes());
            }
        }
        LogFormat::Json => {
            let mut ours = Map::new();
            ours.insert("ts".into(), Value::String(rfc3339(now)));
            ours.insert("worker".into(), Value::from(slot));
            ours.insert("pid".into(), Value::from(pid));
            ours.insert("stream".into(), Value::String(stream.name().into()));
            if piece.split {
                ours.insert("split".into(), Value::Bool(true));
            }
            merge_or_wrap(&mut line, ours, &piece.bytes);
        }
    }
    line.push(b'\n');
    line
}

/// Writes `ours` merged into the worker's own JSON object when the line is one (keeping the
/// worker's text and key order, adding only keys it lacks), else `ours` plus `"msg"`.
fn merge_or_wrap(line: &mut Vec<u8>, mut ours: Map<String, Value>, text: &[u8]) {
    let trimmed = text.trim_ascii();
    if trimmed.starts_with(b"{")
        && let Ok(theirs) = serde_json::from_slice::<Map<String, Value>>(trimmed)
    {
        ours.retain(|key, _| !theirs.contains_key(key));
        let body = &trimmed[1..];
        line.push(b'{');
        for (i, (key, value)) in ours.iter().enumerate() {
            if i > 0 {
                line.push(b',');
            }
            push_json_pair(line, key, value);
        }
        if !ours.is_empty() && !theirs.is_empty() {
            line.push(b',');
        }
        if theirs.is_empty() {
            line.push(b'}');
        } else {
            line.extend_from_slice(body.trim_ascii_start());
        }
        return;
    }
    ours.insert(
        "msg".into(),
        Value::String(String::from_utf8_lossy(text).into_owned()),
    );
    line.extend_from_slice(Value::Object(ours).to_string().as_bytes());
}

fn push_json_pair(line: &mut Vec<u8>, key: &str, value: &Value) {
    line.extend_from_slice(Value::String(key.to_string()).to_string().as_bytes());
    line.push(b':');
    line.extend_from_slice(value.to_string().as_bytes());
}

/// `2026-11-24T22:12:09.123Z` for a point in time, without a date crate.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's method).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The tracing layer that formats corepool's own events and hands them to the stderr writer.
struct EventLayer {
    format: LogFormat,
    sink: mpsc::WeakSender<Vec<u8>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EventLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = event.metadata().level();
        let mut line = match self.format {
            LogFormat::Raw | LogFormat::Prefix => {
                let mut text = format!("corepool {level}: {}", fields.message);
                for (key, value) in &fields.pairs {
                    let _ = write!(text, " {key}={value}");
                }
                text
            }
            LogFormat::Json => {
                let mut object = Map::new();
                object.insert("ts".into(), Value::String(rfc3339(SystemTime::now())));
                object.insert("level".into(), Value::String(level.as_str().to_lowercase()));
                object.insert("source".into(), Value::String("corepool".into()));
                object.insert("msg".into(), Value::String(fields.message));
                for (key, value) in fields.pairs {
                    object.insert(key, Value::String(value));
                }
                Value::Object(object).to_string()
            }
        };
        line.push('\n');
        // Never wait: a full channel means stderr is blocked, and PID 1 must keep going.
        if let Some(sink) = self.sink.upgrade() {
            let _ = sink.try_send(line.into_bytes());
        }
    }
}

/// The message and key=value fields of one tracing event.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.pairs
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.pairs
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str) -> Piece {
        Piece {
            bytes: text.as_bytes().to_vec(),
            split: false,
        }
    }

    fn json_line(text: &str) -> Value {
        let when = UNIX_EPOCH + Duration::from_millis(1_764_022_329_123);
        let line = format_worker_line(LogFormat::Json, 2, 77, Stream::Stderr, &piece(text), when);
        serde_json::from_slice(&line).expect("valid json")
    }

    #[test]
    fn frames_lines_across_chunks() {
        let mut framer = LineFramer::default();
        assert_eq!(framer.push(b"ab"), vec![]);
        assert_eq!(
            framer.push(b"c\nde\n\nf"),
            vec![piece("abc"), piece("de"), piece("")]
        );
        assert_eq!(framer.finish(), Some(piece("f")));
        assert_eq!(framer.finish(), None);
    }

    #[test]
    fn splits_over_long_lines_and_marks_them() {
        let mut framer = LineFramer::default();
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let pieces = framer.push(&long);
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.split && p.bytes.len() == MAX_LINE));
        assert_eq!(framer.push(b"\n")[0].bytes.len(), 10);
        // A line of exactly MAX_LINE bytes then its newline: one split piece, then an empty end.
        let exact = [vec![b'y'; MAX_LINE], b"\n".to_vec()].concat();
        let pieces = framer.push(&exact);
        assert_eq!(pieces.len(), 2);
    }

    #[test]
    fn raw_and_prefix() {
        let when = SystemTime::now();
        let raw = format_worker_line(LogFormat::Raw, 0, 5, Stream::Stdout, &piece("hi"), when);
        assert_eq!(raw, b"hi\n");
        let pre = format_worker_line(LogFormat::Prefix, 3, 42, Stream::Stdout, &piece("hi"), when);
        assert_eq!(pre, b"[3:42] hi\n");
        let split = Piece {
            bytes: b"ab".to_vec(),
            split: true,
        };
        let raw = format_worker_line(LogFormat::Raw, 0, 5, Stream::Stdout, &split, when);
        assert_eq!(raw, format!("ab{SPLIT_MARK}\n").into_bytes());
    }

    #[test]
    fn json_wraps_plain_text() {
        let v = json_line("hello \"world\"");
        assert_eq!(v["msg"], "hello \"world\"");
        assert_eq!(v["worker"], 2);
        assert_eq!(v["pid"], 77);
        assert_eq!(v["stream"], "stderr");
        assert_eq!(v["ts"], "2025-11-24T22:12:09.123Z");
    }

    #[test]
    fn json_merges_objects_without_overwriting() {
        let v = json_line(r#"{"level":30,"pid":1234,"msg":"listening"}"#);
        assert_eq!(v["level"], 30);
        assert_eq!(v["pid"], 1234, "the worker's own pid field is kept");
        assert_eq!(v["msg"], "listening");
        assert_eq!(v["worker"], 2);
        let empty = json_line("{}");
        assert_eq!(empty["worker"], 2);
        let array = json_line("[1,2]");
        assert_eq!(array["msg"], "[1,2]");
        let broken = json_line("{\"a\":");
        assert_eq!(broken["msg"], "{\"a\":");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
