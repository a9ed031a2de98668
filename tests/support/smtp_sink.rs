//! A real SMTP server for tests: accepts mail on `127.0.0.1:PORT`, records it, fails on request.
//!
//! It speaks enough RFC 5321 for lettre (and `swaks`/`curl` by hand): the 220
//! greeting, EHLO/HELO, AUTH PLAIN and LOGIN (accepting anything unless
//! [`SmtpSink::require_auth`] is set, recording the user), MAIL FROM, RCPT TO,
//! DATA with dot-unstuffing, RSET, NOOP, VRFY, QUIT. It advertises neither
//! STARTTLS nor PIPELINING, so clients talk plain text, one command at a time.
//!
//! Faults are queued per stage (`fail_next_*`) or permanent
//! (`set_reject_all`, `reject_recipient`); a 421 reply also closes the connection, as RFC 5321
//! says a server does. Waiting uses a `watch` channel, never sleeps.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Longest command or data line accepted (RFC 5321 allows 1000 with CRLF;
/// this is generous so a client bug shows up as a 500, not a hang).
const MAX_LINE: usize = 64 * 1024;

/// One accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The MAIL FROM address, without angle brackets.
    pub from: String,
    /// The RCPT TO addresses, without angle brackets, in order.
    pub to: Vec<String>,
    /// The message as sent after DATA, dot-unstuffed, CRLF line ends, without the final `.`.
    pub data: String,
    /// The `Subject` header, unfolded and with RFC 2047 words decoded.
    pub subject: Option<String>,
    /// The user who authenticated on the connection, if any.
    pub auth_user: Option<String>,
}

impl ReceivedMail {
    /// A header of the message (first occurrence, unfolded, RFC 2047 words decoded).
    pub fn header(&self, name: &str) -> Option<String> {
        header_in(head_of(&self.data), name)
    }

    /// Every leaf part of the message, bodies decoded (quoted-printable, base64).
    /// A message that is not multipart is one part.
    pub fn parts(&self) -> Vec<MailPart> {
        let mut parts = Vec::new();
        collect_parts(&self.data, &mut parts);
        parts
    }

    /// The decoded `text/plain` body, if there is one.
    pub fn text_body(&self) -> Option<String> {
        self.part("text/plain")
    }

    /// The decoded `text/html` body, if there is one.
    pub fn html_body(&self) -> Option<String> {
        self.part("text/html")
    }

    fn part(&self, content_type: &str) -> Option<String> {
        self.parts()
            .into_iter()
            .find(|p| p.content_type == content_type)
            .map(|p| p.body)
    }
}

/// A leaf MIME part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailPart {
    /// Lowercase media type without parameters, e.g. `text/plain`.
    pub content_type: String,
    /// The body after transfer decoding, as UTF-8 (lossy).
    pub body: String,
}

/// Credentials a client authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRecord {
    pub mechanism: String,
    pub username: String,
    pub password: String,
    /// Whether the sink accepted them.
    pub accepted: bool,
}

#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    text: String,
}

impl Reply {
    fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }

    fn with_default_text(code: u16) -> Reply {
        let text = match code {
            421 => "4.3.2 Service not available, closing transmission channel",
            450 => "4.2.1 Mailbox unavailable, try again later",
            451 => "4.3.0 Local error in processing, try again later",
            452 => "4.3.1 Insufficient system storage",
            550 => "5.1.1 Mailbox unavailable",
            551 => "5.1.6 User not local",
            552 => "5.3.4 Message size exceeds fixed maximum",
            553 => "5.1.3 Mailbox name not allowed",
            554 => "5.0.0 Transaction failed",
            c if (400..500).contains(&c) => "4.0.0 Temporary failure",
            _ => "5.0.0 Permanent failure",
        };
        Reply::new(code, text)
    }
}

#[derive(Default)]
struct Faults {
    mail: VecDeque<Reply>,
    rcpt: VecDeque<Reply>,
    data: VecDeque<Reply>,
    /// Delays before the reply to the end of the next messages' data (the
    /// message is taken all the same), as a server scanning content does.
    data_reply_delays: VecDeque<std::time::Duration>,
    reject_all: Option<Reply>,
    /// Mailboxes refused at RCPT TO, by lowercase address.
    recipients: std::collections::HashMap<String, Reply>,
}

#[derive(Default)]
struct Inner {
    mails: Vec<ReceivedMail>,
    auths: Vec<AuthRecord>,
    connections: usize,
    /// Sessions open now, and the most ever open at once.
    open: usize,
    most_open: usize,
    commands: Vec<String>,
    faults: Faults,
    required_auth: Option<(String, String)>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Number of mails accepted so far; waiters watch it.
    count: watch::Sender<usize>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running SMTP sink; stops when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl SmtpSink {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the SMTP sink");
        let addr = listener.local_addr().expect("SMTP sink address");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            count: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                {
                    let mut inner = accept_shared.lock();
                    inner.connections += 1;
                    inner.open += 1;
                    inner.most_open = inner.most_open.max(inner.open);
                }
                let session_shared = accept_shared.clone();
                let session = tokio::spawn(async move {
                    Session::new(session_shared.clone()).run(stream).await;
                    session_shared.lock().open -= 1;
                });
                let mut tasks = accept_shared
                    .tasks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                tasks.retain(|t| !t.is_finished());
                tasks.push(session.abort_handle());
            }
        });
        shared
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(accept.abort_handle());
        SmtpSink { addr, shared }
    }

    /// `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// `smtp://user:password@127.0.0.1:PORT`, both percent-encoded.
    pub fn url_with_credentials(&self, user: &str, password: &str) -> String {
        format!(
            "smtp://{}:{}@{}",
            percent_encode(user),
            percent_encode(password),
            self.addr
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every mail accepted so far, in order.
    pub fn mails(&self) -> Vec<ReceivedMail> {
        self.shared.lock().mails.clone()
    }

    /// The mails accepted after the first `start`, in order.
    pub fn mails_since(&self, start: usize) -> Vec<ReceivedMail> {
        self.shared
            .lock()
            .mails
            .get(start..)
            .unwrap_or_default()
            .to_vec()
    }

    /// Every AUTH attempt so far.
    pub fn auths(&self) -> Vec<AuthRecord> {
        self.shared.lock().auths.clone()
    }

    /// TCP connections accepted so far (to see connection reuse).
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// The most sessions that were open at the same moment.
    pub fn most_connections_at_once(&self) -> usize {
        self.shared.lock().most_open
    }

    /// Every command line received (AUTH payloads replaced by `AUTH <mechanism> …`).
    pub fn commands(&self) -> Vec<String> {
        self.shared.lock().commands.clone()
    }

    /// Waits until at least `n` mails were accepted; returns all of them.
    pub async fn wait_for_mails(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ReceivedMail>, String> {
        let mut count = self.shared.count.subscribe();
        match tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await {
            Ok(Ok(_)) => Ok(self.mails()),
            Ok(Err(_)) => Err("the SMTP sink stopped".into()),
            Err(_) => Err(format!(
                "only {} of {n} mails arrived within {timeout:?}",
                self.mails().len()
            )),
        }
    }

    /// The next `n` RCPT TO commands get `code text`.
    pub fn fail_next_rcpt(&self, n: usize, code: u16, text: &str) {
        let mut inner = self.shared.lock();
        for _ in 0..n {
            inner.faults.rcpt.push_back(Reply::new(code, text));
        }
    }

    /// The next `n` MAIL FROM commands get `code` (with a standard text).
    pub fn fail_next_mail(&self, n: usize, code: u16) {
        let mut inner = self.shared.lock();
        for _ in 0..n {
            inner.faults.mail.push_back(Reply::with_default_text(code));
        }
    }

    /// The next `n` messages are refused with `code` after their data was sent.
    pub fn fail_next_data(&self, n: usize, code: u16) {
        let mut inner = self.shared.lock();
        for _ in 0..n {
            inner.faults.data.push_back(Reply::with_default_text(code));
        }
    }

    /// The next `n` messages are taken, but the server answers the end of
    /// their data only after `delay` (RFC 5321 allows it 10 minutes).
    pub fn delay_next_data_replies(&self, n: usize, delay: std::time::Duration) {
        let mut inner = self.shared.lock();
        for _ in 0..n {
            inner.faults.data_reply_delays.push_back(delay);
        }
    }

    /// RCPT TO `address` (any case) gets `code` until [`SmtpSink::clear_faults`],
    /// as a server answers for a mailbox it does not have (550).
    pub fn reject_recipient(&self, address: &str, code: u16) {
        self.shared
            .lock()
            .faults
            .recipients
            .insert(address.to_lowercase(), Reply::with_default_text(code));
    }

    /// Every MAIL FROM gets `code` until [`SmtpSink::clear_faults`].
    pub fn set_reject_all(&self, code: u16) {
        self.shared.lock().faults.reject_all = Some(Reply::with_default_text(code));
    }

    /// Drops queued and permanent faults.
    pub fn clear_faults(&self) {
        self.shared.lock().faults = Faults::default();
    }

    /// From now on AUTH succeeds only with these credentials (535 otherwise),
    /// and MAIL FROM without AUTH gets 530.
    pub fn require_auth(&self, user: &str, password: &str) {
        self.shared.lock().required_auth = Some((user.to_string(), password.to_string()));
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        let tasks =
            std::mem::take(&mut *self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One client connection.
struct Session {
    shared: Arc<Shared>,
    greeted: bool,
    auth_user: Option<String>,
    from: Option<String>,
    to: Vec<String>,
}

enum Next {
    Continue,
    Close,
}

type Conn = BufReader<TcpStream>;

impl Session {
    fn new(shared: Arc<Shared>) -> Session {
        Session {
            shared,
            greeted: false,
            auth_user: None,
            from: None,
            to: Vec::new(),
        }
    }

    async fn run(mut self, stream: TcpStream) {
        let mut conn = BufReader::new(stream);
        if send(&mut conn, 220, "localhost ESMTP smtp-sink ready")
            .await
            .is_err()
        {
            return;
        }
        loop {
            let line = match read_line(&mut conn).await {
                Ok(Some(line)) => line,
                _ => return,
            };
            match self.command(&mut conn, &line).await {
                Ok(Next::Continue) => {}
                Ok(Next::Close) | Err(_) => {
                    let _ = conn.get_mut().shutdown().await;
                    return;
                }
            }
        }
    }

    async fn command(&mut self, conn: &mut Conn, line: &str) -> std::io::Result<Next> {
        let (verb, arg) = match line.split_once(' ') {
            Some((verb, arg)) => (verb.to_ascii_uppercase(), arg.trim()),
            None => (line.to_ascii_uppercase(), ""),
        };
        let logged = if verb == "AUTH" {
            format!("AUTH {} …", arg.split(' ').next().unwrap_or(""))
        } else {
            line.to_string()
        };
        self.shared.lock().commands.push(logged);

        match verb.as_str() {
            "EHLO" => {
                self.greeted = true;
                self.reset();
                conn.get_mut()
                    .write_all(
                        b"250-localhost greets you\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
                          250-SIZE 10485760\r\n250 AUTH PLAIN LOGIN\r\n",
                    )
                    .await?;
                Ok(Next::Continue)
            }
            "HELO" => {
                self.greeted = true;
                self.reset();
                reply(conn, 250, "localhost").await
            }
            "AUTH" => self.auth(conn, arg).await,
            "MAIL" => {
                if !self.greeted {
                    return reply(conn, 503, "5.5.1 Send EHLO or HELO first").await;
                }
                if self.from.is_some() {
                    return reply(conn, 503, "5.5.1 Nested MAIL command").await;
                }
                let Some(from) = path_arg(arg, "FROM:") else {
                    return reply(conn, 501, "5.5.4 Syntax: MAIL FROM:<address>").await;
                };
                let required = self.shared.lock().required_auth.is_some();
                if required && self.auth_user.is_none() {
                    return reply(conn, 530, "5.7.0 Authentication required").await;
                }
                let fault = {
                    let mut inner = self.shared.lock();
                    inner
                        .faults
                        .reject_all
                        .clone()
                        .or_else(|| inner.faults.mail.pop_front())
                };
                if let Some(fault) = fault {
                    return reply(conn, fault.code, &fault.text).await;
                }
                self.from = Some(from);
                reply(conn, 250, "2.1.0 Ok").await
            }
            "RCPT" => {
                if self.from.is_none() {
                    return reply(conn, 503, "5.5.1 Need MAIL before RCPT").await;
                }
                let Some(to) = path_arg(arg, "TO:") else {
                    return reply(conn, 501, "5.5.4 Syntax: RCPT TO:<address>").await;
                };
                let fault = {
                    let mut inner = self.shared.lock();
                    inner
                        .faults
                        .recipients
                        .get(&to.to_lowercase())
                        .cloned()
                        .or_else(|| inner.faults.rcpt.pop_front())
                };
                if let Some(fault) = fault {
                    return reply(conn, fault.code, &fault.text).await;
                }
                self.to.push(to);
                reply(conn, 250, "2.1.5 Ok").await
            }
            "DATA" => {
                if self.from.is_none() || self.to.is_empty() {
                    return reply(conn, 503, "5.5.1 Need RCPT before DATA").await;
                }
                send(conn, 354, "End data with <CR><LF>.<CR><LF>").await?;
                let data = read_data(conn).await?;
                let fault = self.shared.lock().faults.data.pop_front();
                let from = self.from.take().unwrap_or_default();
                let to = std::mem::take(&mut self.to);
                if let Some(fault) = fault {
                    return reply(conn, fault.code, &fault.text).await;
                }
                let mail = ReceivedMail {
                    subject: header_in(head_of(&data), "Subject"),
                    from,
                    to,
                    data,
                    auth_user: self.auth_user.clone(),
                };
                let count = {
                    let mut inner = self.shared.lock();
                    inner.mails.push(mail);
                    inner.mails.len()
                };
                self.shared.count.send_replace(count);
                let delay = self.shared.lock().faults.data_reply_delays.pop_front();
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                reply(conn, 250, "2.0.0 Ok: queued").await
            }
            "RSET" => {
                self.reset();
                reply(conn, 250, "2.0.0 Ok").await
            }
            "NOOP" => reply(conn, 250, "2.0.0 Ok").await,
            "VRFY" => reply(conn, 252, "2.1.5 Cannot verify, will attempt delivery").await,
            "QUIT" => {
                send(conn, 221, "2.0.0 Bye").await?;
                Ok(Next::Close)
            }
            "STARTTLS" => reply(conn, 502, "5.5.1 STARTTLS not available").await,
            _ => reply(conn, 500, "5.5.2 Command unrecognized").await,
        }
    }

    async fn auth(&mut self, conn: &mut Conn, arg: &str) -> std::io::Result<Next> {
        if self.auth_user.is_some() {
            return reply(conn, 503, "5.5.1 Already authenticated").await;
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_string())),
            None => (arg.to_ascii_uppercase(), None),
        };
        let credentials = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(i) => i,
                    None => match challenge(conn, "").await? {
                        Some(r) => r,
                        None => return Ok(Next::Close),
                    },
                };
                // authzid \0 authcid \0 password
                base64_decode(&response).and_then(|raw| {
                    let mut fields = raw.split(|b| *b == 0);
                    let _authzid = fields.next()?;
                    let user = String::from_utf8(fields.next()?.to_vec()).ok()?;
                    let password = String::from_utf8(fields.next()?.to_vec()).ok()?;
                    Some((user, password))
                })
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => Some(i),
                    None => challenge(conn, "VXNlcm5hbWU6").await?,
                };
                let Some(user) = user else {
                    return Ok(Next::Close);
                };
                let Some(password) = challenge(conn, "UGFzc3dvcmQ6").await? else {
                    return Ok(Next::Close);
                };
                let decode = |s: &str| base64_decode(s).and_then(|b| String::from_utf8(b).ok());
                decode(&user).zip(decode(&password))
            }
            _ => return reply(conn, 504, "5.5.4 Unrecognized authentication type").await,
        };
        let Some((username, password)) = credentials else {
            return reply(conn, 501, "5.5.2 Cannot decode response").await;
        };
        let accepted = {
            let mut inner = self.shared.lock();
            let accepted = match &inner.required_auth {
                Some((u, p)) => *u == username && *p == password,
                None => true,
            };
            inner.auths.push(AuthRecord {
                mechanism,
                username: username.clone(),
                password,
                accepted,
            });
            accepted
        };
        if accepted {
            self.auth_user = Some(username);
            reply(conn, 235, "2.7.0 Authentication successful").await
        } else {
            reply(conn, 535, "5.7.8 Authentication credentials invalid").await
        }
    }

    fn reset(&mut self) {
        self.from = None;
        self.to.clear();
    }
}

/// Sends a reply; a 421 also ends the session.
async fn reply(conn: &mut Conn, code: u16, text: &str) -> std::io::Result<Next> {
    send(conn, code, text).await?;
    Ok(if code == 421 {
        Next::Close
    } else {
        Next::Continue
    })
}

async fn send(conn: &mut Conn, code: u16, text: &str) -> std::io::Result<()> {
    conn.get_mut()
        .write_all(format!("{code} {text}\r\n").as_bytes())
        .await
}

/// A `334` challenge; `None` when the client went away, `*` cancels (as `None`).
async fn challenge(conn: &mut Conn, prompt: &str) -> std::io::Result<Option<String>> {
    send(conn, 334, prompt).await?;
    Ok(read_line(conn).await?.filter(|line| line != "*"))
}

/// One line without its CRLF; `None` at end of stream.
async fn read_line(conn: &mut Conn) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *conn)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// The message after DATA up to the lone `.`, dot-unstuffed, with CRLF line ends.
async fn read_data(conn: &mut Conn) -> std::io::Result<String> {
    let mut data = String::new();
    loop {
        let Some(line) = read_line(conn).await? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed during DATA",
            ));
        };
        if line == "." {
            return Ok(data);
        }
        let line = line.strip_prefix('.').unwrap_or(&line);
        data.push_str(line);
        data.push_str("\r\n");
    }
}

/// `FROM:<a@b> BODY=8BITMIME` → `a@b` (also without brackets, and `<>`).
fn path_arg(arg: &str, keyword: &str) -> Option<String> {
    if arg.len() < keyword.len() || !arg[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        Some(inner[..end].to_string())
    } else {
        rest.split(' ')
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}

/// The header section of a message or part (before the first empty line).
fn head_of(data: &str) -> &str {
    match data.find("\r\n\r\n") {
        Some(end) => &data[..end + 2],
        None => data,
    }
}

/// The body of a message or part (after the first empty line).
fn body_of(data: &str) -> &str {
    match data.find("\r\n\r\n") {
        Some(end) => &data[end + 4..],
        None => "",
    }
}

/// A header's unfolded, decoded value (first occurrence, name case-insensitive).
fn header_in(head: &str, name: &str) -> Option<String> {
    let mut unfolded: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = unfolded.last_mut() {
                last.push_str(line);
            }
        } else if !line.is_empty() {
            unfolded.push(line.to_string());
        }
    }
    unfolded.iter().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| decode_words(value.trim()))
    })
}

/// Decodes RFC 2047 encoded words (`=?utf-8?b?…?=`, `=?utf-8?q?…?=`);
/// whitespace between two encoded words is dropped, as the RFC says.
fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    let mut after_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, candidate) = rest.split_at(start);
        match decode_word(candidate) {
            Some((decoded, used)) => {
                if !(after_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&decoded);
                rest = &candidate[used..];
                after_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &candidate[2..];
                after_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One encoded word at the start of `text`: its decoding and length.
fn decode_word(text: &str) -> Option<(String, usize)> {
    let inner = text.strip_prefix("=?")?;
    let (charset, rest) = inner.split_once('?')?;
    let (encoding, rest) = rest.split_once('?')?;
    let end = rest.find("?=")?;
    let payload = &rest[..end];
    if !["utf-8", "us-ascii"].contains(&charset.to_ascii_lowercase().as_str()) {
        return None;
    }
    let bytes = match encoding {
        "b" | "B" => base64_decode(payload)?,
        "q" | "Q" => qp_decode(&payload.replace('_', " ")),
        _ => return None,
    };
    let used = 2 + charset.len() + 1 + encoding.len() + 1 + end + 2;
    Some((String::from_utf8_lossy(&bytes).into_owned(), used))
}

/// Walks a (possibly nested) multipart message, collecting decoded leaf parts.
fn collect_parts(entity: &str, out: &mut Vec<MailPart>) {
    let head = head_of(entity);
    let content_type = header_in(head, "Content-Type").unwrap_or_else(|| "text/plain".into());
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let body = body_of(entity);
    if media.starts_with("multipart/") {
        let Some(boundary) = parameter(&content_type, "boundary") else {
            return;
        };
        let delimiter = format!("--{boundary}");
        for chunk in body.split(&delimiter).skip(1) {
            if chunk.starts_with("--") {
                break;
            }
            let chunk = chunk.strip_prefix("\r\n").unwrap_or(chunk);
            let chunk = chunk.strip_suffix("\r\n").unwrap_or(chunk);
            collect_parts(chunk, out);
        }
        return;
    }
    let encoding = header_in(head, "Content-Transfer-Encoding")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let decoded = match encoding.trim() {
        "quoted-printable" => {
            String::from_utf8_lossy(&qp_decode(&body.replace("=\r\n", ""))).into_owned()
        }
        "base64" => base64_decode(&body.replace(['\r', '\n'], ""))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
        _ => body.to_string(),
    };
    out.push(MailPart {
        content_type: media,
        body: decoded,
    });
}

/// `multipart/alternative; boundary="abc"` → `abc`.
fn parameter(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|param| {
        let (key, val) = param.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| val.trim().trim_matches('"').to_string())
    })
}

/// `=XX` → byte; anything else is kept.
fn qp_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Standard base64 with optional padding; `None` on a foreign character.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.trim().bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Percent-encodes everything but unreserved characters, for URL userinfo.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_words() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("AHVzZXIAcGFzcw==").unwrap(), b"\0user\0pass");
        assert_eq!(
            decode_words("=?utf-8?b?w6lj?= =?utf-8?q?h=C3=A9_x?= end"),
            "éché x end"
        );
        assert_eq!(decode_words("plain =? text"), "plain =? text");
    }

    #[test]
    fn path_args() {
        assert_eq!(
            path_arg("FROM:<a@b> BODY=8BITMIME", "FROM:").as_deref(),
            Some("a@b")
        );
        assert_eq!(path_arg("to: <c@d>", "TO:").as_deref(), Some("c@d"));
        assert_eq!(path_arg("FROM:<>", "FROM:").as_deref(), Some(""));
        assert_eq!(path_arg("X", "FROM:"), None);
    }
}
