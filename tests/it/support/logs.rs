//! Log capture for tests that assert on what the layer and the stores log.

use std::sync::{Arc, Mutex};

/// A `tracing` writer into a shared buffer: the lines written while a subscriber made by
/// [`Captured::install`] is the thread's default.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

/// What [`Captured::install`] keeps alive: drop it to stop capturing.
pub type Installed = (tracing::Dispatch, tracing::subscriber::DefaultGuard);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Forgets what was captured so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Installs a fmt subscriber (up to `level`, no colours) writing here, for this thread
    /// only: a test on a current-thread runtime then captures all it spawns too.
    ///
    /// With it, a second dispatcher stays alive for the test: with only one registered,
    /// tracing-core computes the interest of a callsite that another thread hits first
    /// from *that* thread's dispatcher (none, in other tests) and caches "never", which
    /// would drop this test's events. With two, interest is "sometimes" and each thread
    /// asks its own.
    pub fn install(&self, level: tracing::Level) -> Installed {
        let second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (second, tracing::subscriber::set_default(subscriber))
    }
}
