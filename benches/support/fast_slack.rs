//! A fast fake Slack for the benches: `chat.postMessage` only, over real HTTP/1.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

/// The issue's "fast, non-rate-limited fake Slack": `chat.postMessage` over
/// real HTTP/1.1 keep-alive connections, the bot token checked
/// (`invalid_auth` otherwise), `{"ok":true,"channel":…,"ts":…,"message":…}`
/// back (the message echoed with the bot's profile, as Slack answers), and the
/// arrival time and event id of each post recorded. It parses only what it
/// needs, so the CPU it takes from the worker on these two cores stays small:
/// Slack's own servers are not on the worker's machine either.
#[derive(Clone)]
pub struct FastSlack {
    inner: Arc<FastInner>,
    addr: std::net::SocketAddr,
}

struct FastInner {
    authorization: Vec<u8>,
    posts: std::sync::Mutex<Vec<(Instant, String)>>,
    /// Woken when `posts` reaches `wanted`.
    reached: tokio::sync::Notify,
    wanted: AtomicUsize,
    next_ts: AtomicUsize,
}

impl FastSlack {
    pub async fn start(token: &str) -> anyhow::Result<FastSlack> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(FastInner {
            authorization: format!("Bearer {token}").into_bytes(),
            posts: std::sync::Mutex::new(Vec::new()),
            reached: tokio::sync::Notify::new(),
            wanted: AtomicUsize::new(usize::MAX),
            next_ts: AtomicUsize::new(1),
        });
        let serving = Arc::clone(&inner);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_fast(stream, Arc::clone(&serving)));
            }
        });
        Ok(FastSlack { inner, addr })
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    pub fn post_count(&self) -> usize {
        self.inner.posts.lock().map_or(0, |p| p.len())
    }

    pub async fn wait_for_posts(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(Instant, String)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let reached = self.inner.reached.notified();
            tokio::pin!(reached);
            reached.as_mut().enable();
            self.inner.wanted.store(n, Ordering::SeqCst);
            {
                let posts = self
                    .inner
                    .posts
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?;
                if posts.len() >= n {
                    return Ok(posts.clone());
                }
            }
            if tokio::time::timeout_at(deadline, reached).await.is_err() {
                bail!(
                    "the fast Slack got {} of {n} posts in {timeout:?}",
                    self.post_count()
                );
            }
        }
    }
}

/// The value of `name:` in one header line, if the line is that header.
fn header_value<'l>(line: &'l [u8], name: &[u8]) -> Option<&'l [u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    line[..colon]
        .eq_ignore_ascii_case(name)
        .then(|| line[colon + 1..].trim_ascii())
}

/// The JSON string value following `"key":"` in `body` (no escapes expected).
fn string_after<'b>(body: &'b [u8], key: &[u8]) -> Option<&'b [u8]> {
    let start = body.windows(key.len()).position(|w| w == key)? + key.len();
    let len = body[start..].iter().position(|&b| b == b'"')?;
    Some(&body[start..start + len])
}

async fn serve_fast(stream: tokio::net::TcpStream, slack: Arc<FastInner>) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::with_capacity(16 * 1024, read);
    let (mut line, mut body, mut out) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let (mut length, mut authorized, mut post_message) = (0usize, false, false);
        let mut request_line = true;
        loop {
            line.clear();
            if read.read_until(b'\n', &mut line).await? == 0 {
                return Ok(());
            }
            if request_line {
                post_message = line.starts_with(b"POST /api/chat.postMessage ");
                request_line = false;
            } else if line == b"\r\n" {
                break;
            } else if let Some(value) = header_value(&line, b"content-length") {
                length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            } else if let Some(value) = header_value(&line, b"authorization") {
                authorized = value == slack.authorization.as_slice();
            }
        }
        body.resize(length, 0);
        read.read_exact(&mut body).await?;
        let reply = if !post_message {
            r#"{"ok":false,"error":"unknown_method"}"#.to_string()
        } else if !authorized {
            r#"{"ok":false,"error":"invalid_auth"}"#.to_string()
        } else {
            let channel = string_after(&body, br#""channel":""#).unwrap_or_default();
            let channel = String::from_utf8_lossy(channel).into_owned();
            let id = string_after(&body, br#""event_id":""#).unwrap_or_default();
            let id = String::from_utf8_lossy(id).into_owned();
            let count = {
                let mut posts = slack
                    .posts
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?;
                posts.push((Instant::now(), id));
                posts.len()
            };
            if count >= slack.wanted.load(Ordering::SeqCst) {
                slack.reached.notify_waiters();
            }
            let ts = slack.next_ts.fetch_add(1, Ordering::Relaxed);
            // Slack echoes the message it took (text, blocks, metadata, …)
            // with what it adds; the worker reads an answer of that size.
            let posted = body
                .strip_prefix(b"{")
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            format!(
                r#"{{"ok":true,"channel":"{channel}","ts":"1700000000.{ts:06}","message":{{"user":"U0FASTBOT","type":"message","ts":"1700000000.{ts:06}","bot_id":"B0FASTBOT","app_id":"A0FASTAPP","team":"T0FAST","bot_profile":{{"id":"B0FASTBOT","deleted":false,"name":"alert-router","updated":1700000000,"app_id":"A0FASTAPP","icons":{{"image_36":"https://a.slack-edge.com/80588/img/plugins/app/bot_36.png","image_48":"https://a.slack-edge.com/80588/img/plugins/app/bot_48.png","image_72":"https://a.slack-edge.com/80588/img/plugins/app/service_72.png"}},"team_id":"T0FAST"}},{posted}}}"#
            )
        };
        out.clear();
        out.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n\r\n",
                reply.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(reply.as_bytes());
        write.write_all(&out).await?;
    }
}
