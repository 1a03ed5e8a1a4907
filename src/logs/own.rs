//! corepool's own messages: a tracing layer that formats each event like a worker line and
//! queues it to the stderr writer without ever waiting, dropping and counting when full.

use super::line::rfc3339;
use super::writer::{Queued, charge};
use super::{LogFormat, OWN_BUDGET};
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use tokio::sync::{Semaphore, mpsc};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// The tracing layer that formats corepool's own events and hands them to the stderr writer.
pub(super) struct EventLayer {
    pub(super) format: LogFormat,
    pub(super) queue: mpsc::WeakUnboundedSender<Queued>,
    pub(super) budget: Arc<Semaphore>,
    /// Messages dropped because [`OWN_BUDGET`] was used up, not yet reported.
    pub(super) dropped: AtomicU64,
}

impl EventLayer {
    fn own_line(&self, level: &tracing::Level, fields: Fields) -> String {
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
        line
    }

    /// Queues a line if the budget has room for it now; never waits.
    fn try_queue(&self, queue: &mpsc::UnboundedSender<Queued>, line: String) -> bool {
        match self
            .budget
            .clone()
            .try_acquire_many_owned(charge(line.len(), OWN_BUDGET))
        {
            Ok(charge) => queue
                .send(Queued {
                    bytes: line.into_bytes(),
                    _charge: charge,
                })
                .is_ok(),
            Err(_) => false,
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EventLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let line = self.own_line(event.metadata().level(), fields);
        let Some(queue) = self.queue.upgrade() else {
            return;
        };
        // Never wait: a full budget means stderr is blocked, and PID 1 must keep going.
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            let note = Fields {
                message: format!(
                    "{dropped} of corepool's own log messages dropped: stderr was not read"
                ),
                pairs: Vec::new(),
            };
            if !self.try_queue(&queue, self.own_line(&tracing::Level::WARN, note)) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.dropped.fetch_sub(dropped, Ordering::Relaxed);
        }
        if !self.try_queue(&queue, line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
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
