//! A fault-injection TCP proxy on loopback, to put between a Redis client and a server
//! and break the network on cue: delay (both ways, or only replies), black-hole (losing
//! bytes, or stalling them as a partition under TCP does), reset, cut mid-stream, lose
//! one reply, refuse.
//!
//! The mode is shared by the accept loop and every live connection (a `watch` channel),
//! so switching it affects connections that are already open. Modes that cut
//! connections close both sides abruptly (`SO_LINGER` 0, so the peers get RST).
//! Do not use it under `#[tokio::test(start_paused = true)]`: `delay` uses tokio time.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    Delay(Duration),
    /// Only the upstream → client direction is delayed.
    DelayReplies(Duration),
    Blackhole,
    Stall,
    Reset,
    CutAfter,
    /// The next chunk from upstream is dropped and its connection cut; then `Pass`.
    CutNextReply,
    Refuse,
}

#[derive(Clone, Copy, Debug)]
struct State {
    mode: Mode,
    /// Bumped to cut every connection opened before the bump.
    epoch: u64,
    /// Set when the proxy is dropped: everything stops.
    stopped: bool,
}

struct Shared {
    upstream: SocketAddr,
    addr: SocketAddr,
    state: watch::Sender<State>,
    /// `None` while refusing (the port is closed, so connects get ECONNREFUSED).
    listener: Mutex<Option<TcpListener>>,
    /// Bytes `cut_after` may still forward, across both directions and all connections.
    budget: AtomicU64,
    accepted: AtomicUsize,
}

impl Shared {
    fn listener(&self) -> MutexGuard<'_, Option<TcpListener>> {
        self.listener
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, mode: Mode, cut_live: bool) {
        self.state.send_modify(|s| {
            s.mode = mode;
            s.epoch += u64::from(cut_live);
        });
    }

    /// Takes up to `n` bytes from the `cut_after` budget; returns how many may be sent.
    fn take_budget(&self, n: usize) -> usize {
        let n = n as u64;
        let before = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(n))
            })
            .unwrap_or_else(|b| b);
        before.min(n) as usize
    }
}

/// A loopback TCP proxy in front of `upstream` whose behaviour tests switch at run time.
///
/// It starts in [`pass`](Self::pass) mode. Dropping it stops the accept loop, closes the
/// port and cuts every connection. Mode switches are synchronous and take effect at once
/// for new connections, and for live ones at their next chunk (or at once for cuts).
pub struct FaultProxy {
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and starts proxying to `upstream` on the current tokio
    /// runtime. Panics if `upstream` is not a loopback address.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        assert!(
            upstream.ip().is_loopback(),
            "FaultProxy only proxies to loopback addresses, got {upstream}"
        );
        let listener = bind(0);
        let addr = listener
            .local_addr()
            .expect("FaultProxy: local_addr of its listener");
        let (state, _) = watch::channel(State {
            mode: Mode::Pass,
            epoch: 0,
            stopped: false,
        });
        let shared = Arc::new(Shared {
            upstream,
            addr,
            state,
            listener: Mutex::new(Some(listener)),
            budget: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
        });
        tokio::spawn(accept_loop(shared.clone()));
        FaultProxy { shared }
    }

    /// The proxy's listening address (`127.0.0.1:PORT`); stays the same after `refuse`.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `redis://127.0.0.1:PORT`, to hand to a Redis client instead of the server's URL.
    pub fn url(&self) -> String {
        format!("redis://{}", self.shared.addr)
    }

    /// TCP connections accepted so far, including ones reset right after accept
    /// (a way to count client reconnects). Refused connects are not counted.
    pub fn connections_accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Normal forwarding (the initial mode). Ends `reset`, `refuse` and a finished
    /// `cut_after`; after `refuse` the port is listened on again before this returns.
    pub fn pass(&self) {
        self.relisten();
        self.shared.set(Mode::Pass, false);
    }

    /// Delays every chunk read, in both directions, by `d` before forwarding it. Chunks
    /// of one direction stay in order, so back-to-back chunks add up (a request/reply
    /// round trip gets at least `2 * d` slower).
    pub fn delay(&self, d: Duration) {
        self.relisten();
        self.shared.set(Mode::Delay(d), false);
    }

    /// Delays every chunk read from upstream by `d` before forwarding it; requests pass at
    /// once. So a command runs in the server when it is sent, and only its reply is late:
    /// what the server answered about time (a remaining TTL) is older than it looks to the
    /// client. Back-to-back reply chunks add up, as with [`delay`](Self::delay).
    pub fn delay_replies(&self, d: Duration) {
        self.relisten();
        self.shared.set(Mode::DelayReplies(d), false);
    }

    /// Keeps connections open and accepts new ones, but forwards nothing: bytes read in
    /// either direction are discarded (the client sees a hang, not an error). After
    /// [`pass`](Self::pass) live connections forward again, minus what was discarded.
    pub fn blackhole(&self) {
        self.relisten();
        self.shared.set(Mode::Blackhole, false);
    }

    /// A black-hole that loses nothing, as a network partition looks to TCP (which
    /// retransmits what the partition dropped): connections stay open and new ones are
    /// accepted, but nothing is forwarded; what is read meanwhile is held and forwarded,
    /// in order, once another mode is set. Unlike [`blackhole`](Self::blackhole), a
    /// request sent during it is answered when it ends, so no stream loses its framing.
    pub fn stall(&self) {
        self.relisten();
        self.shared.set(Mode::Stall, false);
    }

    /// Cuts all live connections with RST (client and upstream side) and resets every
    /// new connection right after accepting it, until [`pass`](Self::pass).
    pub fn reset(&self) {
        self.relisten();
        self.shared.set(Mode::Reset, true);
    }

    /// Forwards up to `n` more bytes, counted across both directions and all connections
    /// from now, then cuts all connections like [`reset`](Self::reset) and stays in reset
    /// mode until [`pass`](Self::pass). A chunk crossing the limit is forwarded in part.
    /// `cut_after(0)` is `reset()`. E.g. `cut_after(request_len)` lets the request
    /// reach the server and loses the reply.
    pub fn cut_after(&self, n: u64) {
        if n == 0 {
            return self.reset();
        }
        self.relisten();
        self.shared.budget.store(n, Ordering::SeqCst);
        self.shared.set(Mode::CutAfter, false);
    }

    /// Loses the next reply: the next chunk any connection reads from upstream is not
    /// forwarded, that connection is cut (RST both ways), and the proxy goes back to
    /// [`pass`](Self::pass) on its own, so the client's reconnect gets through at once.
    /// Requests keep flowing until then, so e.g. a command reaches the server and runs,
    /// but its client never sees the answer and (fred, with `max_command_attempts` > 1)
    /// sends it again on the new connection. Other connections stay up.
    pub fn cut_next_reply(&self) {
        self.relisten();
        self.shared.set(Mode::CutNextReply, false);
    }

    /// Like a server that is down: cuts live connections with RST and closes the
    /// listening socket, so new connects fail with `ECONNREFUSED`. Any other mode
    /// re-binds the same port (panicking in the unlikely case another socket took it).
    pub fn refuse(&self) {
        self.shared.set(Mode::Refuse, true);
        drop(self.shared.listener().take());
    }

    /// Re-binds the proxy's port if `refuse` closed it.
    fn relisten(&self) {
        let mut listener = self.shared.listener();
        if listener.is_none() {
            *listener = Some(bind(self.shared.addr.port()));
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.state.send_modify(|s| s.stopped = true);
        drop(self.shared.listener().take());
    }
}

/// Binds `127.0.0.1:port` synchronously (so `pass()` after `refuse()` listens before it
/// returns). Needs to run inside a tokio runtime.
fn bind(port: u16) -> TcpListener {
    let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("FaultProxy: cannot bind 127.0.0.1:{port}: {e}"));
    std_listener
        .set_nonblocking(true)
        .expect("FaultProxy: set_nonblocking on its listener");
    TcpListener::from_std(std_listener)
        .expect("FaultProxy: register listener (inside a tokio runtime?)")
}

/// Closes a socket abruptly: RST instead of FIN, unsent data discarded.
fn abort(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(sh: Arc<Shared>) {
    let mut rx = sh.state.subscribe();
    loop {
        let accepted = tokio::select! {
            r = poll_fn(|cx| match &*sh.listener() {
                Some(l) => l.poll_accept(cx),
                None => Poll::Pending, // refusing: woken by the next mode change
            }) => r,
            changed = rx.changed() => {
                if changed.is_err() || rx.borrow().stopped {
                    return;
                }
                continue;
            }
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await; // e.g. EMFILE: don't spin
            continue;
        };
        sh.accepted.fetch_add(1, Ordering::SeqCst);
        let state = *rx.borrow();
        match state.mode {
            _ if state.stopped => return,
            Mode::Reset | Mode::Refuse => abort(client),
            _ => drop(tokio::spawn(serve(client, sh.clone(), state.epoch))),
        }
    }
}

/// Resolves when connections of `epoch` must be cut (a reset bumped it, or the proxy
/// was dropped).
async fn cut_signal(rx: &mut watch::Receiver<State>, epoch: u64) {
    let _ = rx.wait_for(|s| s.stopped || s.epoch != epoch).await;
}

/// One proxied connection: both directions pumped concurrently in this task, so a cut
/// can drop them and then RST both sockets.
async fn serve(mut client: TcpStream, sh: Arc<Shared>, epoch: u64) {
    let mut rx = sh.state.subscribe();
    let connected = tokio::select! {
        r = TcpStream::connect(sh.upstream) => r.ok(),
        _ = cut_signal(&mut rx, epoch) => None,
    };
    let Some(mut upstream) = connected else {
        return abort(client); // upstream down: the client sees a reset
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let clean = {
        let (client_rd, client_wr) = client.split();
        let (up_rd, up_wr) = upstream.split();
        tokio::select! {
            r = async { tokio::try_join!(pump(client_rd, up_wr, &sh, false), pump(up_rd, client_wr, &sh, true)) } => r.is_ok(),
            _ = cut_signal(&mut rx, epoch) => false,
        }
    };
    if !clean {
        // A cut, or one side failed (e.g. the server died): pass it on as a reset.
        abort(client);
        abort(upstream);
    }
}

/// Copies one direction chunk by chunk, applying the mode current at each chunk
/// (`reply`: this is the upstream → client direction). EOF is forwarded as a FIN
/// (half-close).
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    sh: &Shared,
    reply: bool,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let mut mode = sh.state.borrow().mode;
        if mode == Mode::Stall {
            // Hold the chunk (and, by not reading, everything behind it) until the stall
            // ends; a cut or the proxy's drop ends this task meanwhile.
            let mut rx = sh.state.subscribe();
            let _ = rx.wait_for(|s| s.stopped || s.mode != Mode::Stall).await;
            mode = sh.state.borrow().mode;
        }
        let forward = match mode {
            Mode::Pass => n,
            Mode::Delay(d) => {
                tokio::time::sleep(d).await;
                n
            }
            Mode::DelayReplies(d) if reply => {
                tokio::time::sleep(d).await;
                n
            }
            Mode::DelayReplies(_) => n,
            Mode::CutAfter => sh.take_budget(n),
            Mode::CutNextReply if reply => {
                // Only the first connection to see a reply after the switch cuts; the
                // error ends this connection at once (nothing more gets through on it),
                // and `serve` resets both sides.
                let mine = sh.state.send_if_modified(|s| {
                    let first = s.mode == Mode::CutNextReply;
                    if first {
                        s.mode = Mode::Pass;
                    }
                    first
                });
                if mine {
                    return Err(io::Error::other("cut_next_reply"));
                }
                n
            }
            Mode::CutNextReply => n,
            // Only when the proxy stopped while stalled: nothing more goes through.
            Mode::Stall => 0,
            // Blackhole discards; Reset/Refuse: the cut signal is about to end this task.
            Mode::Blackhole | Mode::Reset | Mode::Refuse => 0,
        };
        to.write_all(&buf[..forward]).await?;
        if mode == Mode::CutAfter && sh.budget.load(Ordering::SeqCst) == 0 {
            sh.set(Mode::Reset, true);
        }
    }
}
