//! Progress bars on stderr for the phases a person waits through (the concurrency burst,
//! the in-flight wait, the TTL wait), with `indicatif`; hidden when turned off or when
//! stderr is not a terminal.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Progress {
    enabled: bool,
}

impl Progress {
    pub(crate) fn new(enabled: bool) -> Progress {
        Progress { enabled }
    }

    fn target(&self) -> ProgressDrawTarget {
        if self.enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        }
    }

    /// A bar of `len` steps.
    pub(crate) fn bar(&self, len: u64, message: String) -> ProgressBar {
        let style = ProgressStyle::with_template("{msg:<40} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(len), self.target())
            .with_style(style)
            .with_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }

    /// A countdown of `secs` seconds.
    pub(crate) fn countdown(&self, secs: u64, message: String) -> ProgressBar {
        let style = ProgressStyle::with_template("{msg:<40} [{bar:30}] {pos}/{len} s")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        ProgressBar::with_draw_target(Some(secs), self.target())
            .with_style(style)
            .with_message(message)
    }

    /// A spinner for a wait of unknown length.
    pub(crate) fn spinner(&self, message: String) -> ProgressBar {
        let style = ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::with_draw_target(None, self.target())
            .with_style(style)
            .with_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }
}
