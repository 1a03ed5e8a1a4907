//! A pump reads one worker pipe, cuts the bytes into lines ([`LineFramer`]) and queues each
//! formatted line to its stream's writer once the line's size is granted by the budget.

use super::line::WorkerLine;
use super::writer::{Queued, Sink, charge};
use super::{CHUNK, LogFormat, MAX_LINE, STREAM_BUDGET, Stream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::AsyncReadExt;

/// Where a worker line came from: everything a formatted line needs besides its text.
pub(super) struct Origin {
    pub(super) format: LogFormat,
    pub(super) stream: Stream,
    pub(super) slot: usize,
    pub(super) pid: i32,
}

pub(super) async fn pump(pipe: OwnedFd, origin: Arc<Origin>, sink: Sink) {
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
    let mut chunk = vec![0u8; CHUNK];
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
        // One piece at a time: a chunk of empty lines must not become 64 Ki pieces at once.
        let mut rest = &chunk[..n];
        while let Some(piece) = framer.next_piece(&mut rest) {
            if !forward(&origin, &piece, &sink).await {
                return;
            }
        }
    }
    if let Some(piece) = framer.finish() {
        forward(&origin, &piece, &sink).await;
    }
}

/// Formats one piece and queues it, first waiting for its size in the stream's byte budget;
/// false when the writer is gone.
async fn forward(origin: &Origin, piece: &Piece, sink: &Sink) -> bool {
    let line = WorkerLine::new(
        origin.format,
        origin.slot,
        origin.pid,
        origin.stream,
        piece,
        SystemTime::now(),
    );
    let len = line.len();
    let Ok(charge) = sink
        .budget
        .clone()
        .acquire_many_owned(charge(len, STREAM_BUDGET))
        .await
    else {
        return false;
    };
    let bytes = line.to_bytes(len);
    sink.queue
        .send(Queued {
            bytes,
            _charge: charge,
        })
        .is_ok()
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
    /// Consumes bytes from the front of `bytes` up to the end of the next completed piece and
    /// returns it; None once `bytes` is used up without completing one (kept for later).
    pub fn next_piece(&mut self, bytes: &mut &[u8]) -> Option<Piece> {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.pending.extend_from_slice(&window[..nl]);
                    *bytes = &bytes[nl + 1..];
                    return Some(Piece {
                        bytes: std::mem::take(&mut self.pending),
                        split: false,
                    });
                }
                None => {
                    self.pending.extend_from_slice(window);
                    *bytes = &bytes[window.len()..];
                    if self.pending.len() == MAX_LINE {
                        return Some(Piece {
                            bytes: std::mem::take(&mut self.pending),
                            split: true,
                        });
                    }
                }
            }
        }
        None
    }

    /// Adds bytes; returns all the pieces completed by them.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        while let Some(piece) = self.next_piece(&mut bytes) {
            out.push(piece);
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
