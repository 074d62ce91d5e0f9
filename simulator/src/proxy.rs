//! The TCP proxy a run with link faults puts between the reference system
//! and a backend (a MySQL shard's server, Redis): the system is given the
//! proxy's address, and a fault sets what the link does for its length:
//! carry nothing (blackhole), reset every connection, delay what goes to
//! the backend, or reset a share of the connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the link does now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkState {
    /// Carries everything as it comes.
    Up,
    /// Carries nothing: bytes in flight are held, new connections wait
    /// unanswered, until the link is up again (a partition shorter than
    /// the peers' timeouts).
    Blackhole,
    /// Closes every open connection mid-conversation and resets each new
    /// one, until it is up again (a partition the peers see at once).
    Reset,
    /// Holds each chunk on its way to the backend for `delay_ms` plus up to
    /// `jitter_ms` drawn afresh, so a round trip gains about that much.
    Slow { delay_ms: u64, jitter_ms: u64 },
    /// Closes each open connection with chance `share` when the fault
    /// starts, and resets each new one with that chance.
    Flaky { share: f64 },
}

/// A running proxy: its address, and the switch of its link.
pub struct Link {
    /// Where the system connects instead of the backend.
    pub addr: SocketAddr,
    state: watch::Sender<LinkState>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Link {
    /// Starts a proxy on loopback for the backend at `upstream`
    /// (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Link> {
        let upstream: Vec<SocketAddr> = tokio::net::lookup_host(upstream)
            .await
            .with_context(|| format!("cannot resolve {upstream}"))?
            .collect();
        anyhow::ensure!(!upstream.is_empty(), "the backend resolves to no address");
        let upstream: Arc<[SocketAddr]> = upstream.into();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot open a port on loopback for a link proxy")?;
        let addr = listener.local_addr()?;
        let (state, watch) = watch::channel(LinkState::Up);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = client.set_nodelay(true);
                tokio::spawn(carry(client, upstream.clone(), watch.clone()));
            }
        });
        Ok(Link {
            addr,
            state,
            accept,
        })
    }

    /// Sets what the link does from now on.
    pub fn set(&self, state: LinkState) {
        self.state.send_replace(state);
    }

    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }
}

/// Whether a connection is cut by the link's state `now` (a draw for
/// `Flaky`).
fn cut(now: LinkState) -> bool {
    match now {
        LinkState::Reset => true,
        LinkState::Flaky { share } => rand::random::<f64>() < share,
        _ => false,
    }
}

/// Closes a connection with a reset rather than an orderly close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One client connection: waits out a blackhole, connects to the backend
/// and carries both ways until either side closes or the link cuts it.
async fn carry(
    client: TcpStream,
    upstream: Arc<[SocketAddr]>,
    mut watch: watch::Receiver<LinkState>,
) {
    loop {
        let now = *watch.borrow_and_update();
        if cut(now) {
            return reset(client);
        }
        if now != LinkState::Blackhole {
            break;
        }
        if watch.changed().await.is_err() {
            return;
        }
    }
    // Each address in turn, as a client would (`localhost` may be ::1 first).
    let mut server = None;
    for addr in upstream.iter() {
        if let Ok(s) = TcpStream::connect(addr).await {
            server = Some(s);
            break;
        }
    }
    let Some(server) = server else {
        return reset(client);
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (up, down) = (watch.clone(), watch.clone());
    let both = async {
        tokio::join!(
            pump(client_read, server_write, up, true),
            pump(server_read, client_write, down, false),
        )
    };
    // A change of state that cuts this connection ends it: the halves are
    // dropped, and both peers see it closed mid-conversation.
    let cutter = async {
        loop {
            if watch.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if cut(*watch.borrow_and_update()) {
                return;
            }
        }
    };
    tokio::select! {
        _ = both => {}
        _ = cutter => {}
    }
}

/// Copies one direction, holding each chunk while the link is a blackhole
/// and, toward the backend, for the delay of a slow link.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut watch: watch::Receiver<LinkState>,
    toward_backend: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        loop {
            let now = *watch.borrow_and_update();
            match now {
                LinkState::Reset => return,
                LinkState::Blackhole => {
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
                LinkState::Slow {
                    delay_ms,
                    jitter_ms,
                } if toward_backend => {
                    let jitter = if jitter_ms > 0 {
                        rand::random::<u64>() % (jitter_ms + 1)
                    } else {
                        0
                    };
                    tokio::time::sleep(Duration::from_millis(delay_ms + jitter)).await;
                    break;
                }
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A URL with its host and port replaced by the proxy's; answers the
/// backend's `host:port` too.
pub fn via_proxy(url: &str, proxy: SocketAddr) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).with_context(|| format!("cannot parse {url}"))?;
    anyhow::ensure!(parsed.host_str().is_some(), "{} names no host", redact(url));
    anyhow::ensure!(
        !parsed.query_pairs().any(|(k, _)| k == "socket"),
        "{} connects over a socket file: a link fault needs a TCP address",
        redact(url)
    );
    // The proxy's address in the URL would fail a check of the server's
    // name in its certificate.
    let verifies_name = parsed.scheme() == "rediss"
        || parsed
            .query_pairs()
            .any(|(k, v)| k == "ssl-mode" && v.eq_ignore_ascii_case("verify_identity"));
    anyhow::ensure!(
        !verifies_name,
        "{} checks the server's name over TLS, which a proxy in between breaks: link faults need a plain connection",
        redact(url)
    );
    parsed
        .set_host(Some(&proxy.ip().to_string()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    parsed
        .set_port(Some(proxy.port()))
        .map_err(|_| anyhow::anyhow!("cannot set a port in {}", redact(url)))?;
    Ok(parsed.to_string())
}

/// The backend's `host:port` of a URL, with the scheme's default port.
pub fn host_port(url: &str) -> anyhow::Result<String> {
    let parsed =
        reqwest::Url::parse(url).with_context(|| format!("cannot parse {}", redact(url)))?;
    let host = parsed
        .host_str()
        .with_context(|| format!("{} names no host", redact(url)))?;
    let port = parsed
        .port()
        .or_else(|| match parsed.scheme() {
            "mysql" | "mariadb" => Some(3306),
            "redis" => Some(6379),
            _ => None,
        })
        .with_context(|| format!("{} names no port", redact(url)))?;
    Ok(format!("{host}:{port}"))
}

fn redact(url: &str) -> String {
    shardpay_reference::ledger::mysql::redact(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn a_link_carries_holds_delays_and_cuts() {
        let backend = echo().await;
        let link = Link::start(&backend.to_string()).await.unwrap();
        let mut s = TcpStream::connect(link.addr).await.unwrap();
        assert_eq!(round_trip(&mut s).await.unwrap(), b"ping");

        // Blackhole: nothing comes back until the link is up again.
        link.set(LinkState::Blackhole);
        s.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        let waited = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await;
        assert!(waited.is_err(), "a blackholed link answered");
        link.set(LinkState::Up);
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"held");

        // Slow: a round trip takes at least the delay.
        link.set(LinkState::Slow {
            delay_ms: 200,
            jitter_ms: 0,
        });
        let t = std::time::Instant::now();
        round_trip(&mut s).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );

        // Reset: the open connection is cut, and a new one too.
        link.set(LinkState::Reset);
        assert!(round_trip(&mut s).await.is_err(), "a reset link carried");
        let mut fresh = TcpStream::connect(link.addr).await.unwrap();
        assert!(round_trip(&mut fresh).await.is_err());

        // Flaky with share 1 cuts every new connection; share 0 none.
        link.set(LinkState::Flaky { share: 1.0 });
        let mut fresh = TcpStream::connect(link.addr).await.unwrap();
        assert!(round_trip(&mut fresh).await.is_err());
        link.set(LinkState::Flaky { share: 0.0 });
        let mut fresh = TcpStream::connect(link.addr).await.unwrap();
        assert_eq!(round_trip(&mut fresh).await.unwrap(), b"ping");
    }

    #[test]
    fn urls_are_pointed_at_the_proxy() {
        let proxy: SocketAddr = "127.0.0.1:4444".parse().unwrap();
        assert_eq!(
            via_proxy("mysql://root:pw@10.0.0.5:3307/shard_2", proxy).unwrap(),
            "mysql://root:pw@127.0.0.1:4444/shard_2"
        );
        assert_eq!(
            via_proxy("redis://127.0.0.1:6379", proxy).unwrap(),
            "redis://127.0.0.1:4444"
        );
        assert_eq!(host_port("mysql://root@db/x").unwrap(), "db:3306");
        assert_eq!(host_port("redis://h:7000/0").unwrap(), "h:7000");
        assert!(via_proxy("mysql://root@localhost/x?socket=/tmp/m.sock", proxy).is_err());
        assert!(via_proxy("rediss://h:6380", proxy).is_err());
        assert!(via_proxy("mysql://root@db/x?ssl-mode=VERIFY_IDENTITY", proxy).is_err());
        assert!(via_proxy("mysql://root@db/x?websocket_ok=1", proxy).is_ok());
    }
}
