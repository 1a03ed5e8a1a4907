//! Unit tests of the log formats, the framing and the budgets.

use super::line::WorkerLine;
use super::own::EventLayer;
use super::writer::{Queued, charge};
use super::*;
use serde_json::Value;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, mpsc};

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
fn json_merges_objects_and_corepool_fields_win() {
    let v = json_line(r#"{"level":30,"pid":1234,"msg":"listening"}"#);
    assert_eq!(v["level"], 30);
    assert_eq!(v["pid"], 77, "corepool's pid wins");
    assert_eq!(
        v["app_pid"], 1234,
        "the worker's own pid is kept as app_pid"
    );
    assert_eq!(v["msg"], "listening");
    assert_eq!(v["worker"], 2);
    let forged = json_line(
        r#"{"worker":99,"pid":1,"ts":"x","stream":"s","source":"corepool","split":1,"n":{"a":[1, 2]}}"#,
    );
    assert_eq!(forged["worker"], 2);
    assert_eq!(forged["pid"], 77);
    assert_eq!(forged["ts"], "2025-11-24T22:12:09.123Z");
    assert_eq!(forged["stream"], "stderr");
    assert_eq!(forged.get("source"), None);
    assert_eq!(forged.get("split"), None);
    assert_eq!(forged["app_worker"], 99);
    assert_eq!(forged["app_pid"], 1);
    assert_eq!(forged["app_ts"], "x");
    assert_eq!(forged["app_stream"], "s");
    assert_eq!(forged["app_source"], "corepool");
    assert_eq!(forged["app_split"], 1);
    assert_eq!(forged["n"]["a"][1], 2);
    let empty = json_line("{}");
    assert_eq!(empty["worker"], 2);
    let array = json_line("[1,2]");
    assert_eq!(array["msg"], "[1,2]");
    let broken = json_line("{\"a\":");
    assert_eq!(broken["msg"], "{\"a\":");
    let trailing = json_line("{\"a\":1} x");
    assert_eq!(trailing["msg"], "{\"a\":1} x");
}

#[test]
fn json_renaming_never_duplicates_a_key() {
    let when = UNIX_EPOCH;
    let text = r#"{"ts":1,"app_ts":2,"app_app_ts":3,"msg":"m"}"#;
    let line = format_worker_line(LogFormat::Json, 0, 5, Stream::Stdout, &piece(text), when);
    let text = String::from_utf8(line).unwrap();
    // Keys in order, none twice (serde_json's Map would silently keep only the last).
    assert!(text.starts_with(r#"{"ts":"1970-01-01T00:00:00.000Z","worker":0,"pid":5,"stream":"stdout","app_app_app_ts":1,"app_ts":2,"app_app_ts":3,"msg":"m"}"#), "{text}");
}

#[test]
fn the_size_is_known_before_the_line_is_built() {
    let mut bytes: Vec<u8> = (0u8..=255).collect();
    bytes.extend_from_slice("é\"\\".as_bytes());
    let texts = [
        bytes.clone(),
        b"{\"a\" : [1,  2], \"pid\":\"\\u0001\\u00e9\"}".to_vec(),
        Vec::new(),
    ];
    for format in [LogFormat::Raw, LogFormat::Prefix, LogFormat::Json] {
        for text in &texts {
            for split in [false, true] {
                let piece = Piece {
                    bytes: text.clone(),
                    split,
                };
                let line = WorkerLine::new(format, 3, 9, Stream::Stdout, &piece, UNIX_EPOCH);
                let built = line.to_bytes(line.len());
                assert_eq!(built.len(), line.len());
                assert_eq!(
                    built.capacity(),
                    line.len(),
                    "no reallocation while building"
                );
                assert!(built.ends_with(b"\n"));
            }
        }
    }
    // The JSON worst case (control bytes, 6 each) of a whole MAX_LINE piece fits a budget.
    let piece = Piece {
        bytes: vec![1u8; MAX_LINE],
        split: true,
    };
    let line = WorkerLine::new(LogFormat::Json, 0, 1, Stream::Stdout, &piece, UNIX_EPOCH);
    assert!(line.len() > 6 * MAX_LINE && line.len() + LINE_OVERHEAD < STREAM_BUDGET);
    assert_eq!(
        charge(10 * STREAM_BUDGET, STREAM_BUDGET) as usize,
        STREAM_BUDGET
    );
}

#[test]
fn next_piece_hands_out_one_piece_at_a_time() {
    let mut framer = LineFramer::default();
    let mut rest: &[u8] = b"a\n\nbc";
    assert_eq!(framer.next_piece(&mut rest), Some(piece("a")));
    assert_eq!(rest, b"\nbc");
    assert_eq!(framer.next_piece(&mut rest), Some(piece("")));
    assert_eq!(framer.next_piece(&mut rest), None);
    assert!(rest.is_empty());
    assert_eq!(framer.finish(), Some(piece("bc")));
}

#[test]
fn own_messages_never_wait_and_drops_are_counted() {
    let (queue, mut rx) = mpsc::unbounded_channel::<Queued>();
    let budget = Arc::new(Semaphore::new(1000));
    let layer = EventLayer {
        format: LogFormat::Raw,
        queue: queue.downgrade(),
        budget: budget.clone(),
        dropped: AtomicU64::new(0),
    };
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        for n in 0..100 {
            tracing::info!("message {n} {}", "x".repeat(100));
        }
    });
    let mut kept = Vec::new();
    while let Ok(line) = rx.try_recv() {
        kept.push(String::from_utf8(line.bytes).unwrap());
    }
    // Each line costs ~130 bytes + LINE_OVERHEAD: 5 fit in 1000, the rest were dropped.
    assert_eq!(kept.len(), 5, "{kept:?}");
    assert!(kept[4].starts_with("corepool INFO: message 4 "));
    assert_eq!(
        budget.available_permits(),
        1000,
        "written lines give their bytes back"
    );
    let layer = tracing_subscriber::registry().with(EventLayer {
        format: LogFormat::Raw,
        queue: queue.downgrade(),
        budget: budget.clone(),
        dropped: AtomicU64::new(95),
    });
    tracing::subscriber::with_default(layer, || tracing::info!("later"));
    let note = String::from_utf8(rx.try_recv().unwrap().bytes).unwrap();
    assert_eq!(
        note,
        "corepool WARN: 95 of corepool's own log messages dropped: stderr was not read\n"
    );
    assert_eq!(rx.try_recv().unwrap().bytes, b"corepool INFO: later\n");
}

#[test]
fn dates() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
    assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
}
