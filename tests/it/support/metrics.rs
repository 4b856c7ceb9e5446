//! A process-wide `metrics` recorder that counts, so tests can assert that an outcome was
//! counted (e.g. `idempotency_complete_failed_total`). Gauges and histograms are dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

#[derive(Default)]
struct Counting {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

static RECORDER: OnceLock<&'static Counting> = OnceLock::new();

fn recorder() -> &'static Counting {
    RECORDER.get_or_init(|| {
        let recorder: &'static Counting = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).expect("no other metrics recorder in tests");
        recorder
    })
}

/// Installs the recorder (idempotent). Call before the code under test runs.
pub fn install() {
    recorder();
}

/// The sum of every counter named `name` whose labels include each `label=value` given.
pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    let counters = recorder().counters.lock().expect("counters lock");
    counters
        .iter()
        .filter(|(key, _)| {
            let (key_name, key_labels) = key.split_once('{').unwrap_or((key, ""));
            let key_labels = key_labels.strip_suffix('}').unwrap_or(key_labels);
            key_name == name
                && labels
                    .iter()
                    .all(|(l, v)| key_labels.split(',').any(|kv| kv == format!("{l}={v}")))
        })
        .map(|(_, value)| value.load(Ordering::Relaxed))
        .sum()
}

impl Recorder for Counting {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let mut counters = self.counters.lock().expect("counters lock");
        Counter::from_arc(counters.entry(name).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Every counter as `name{label=value,..} = count`, for failure messages.
pub fn dump() -> Vec<String> {
    let counters = recorder().counters.lock().expect("counters lock");
    let mut out: Vec<String> = counters
        .iter()
        .map(|(key, value)| format!("{key} = {}", value.load(Ordering::Relaxed)))
        .collect();
    out.sort();
    out
}
