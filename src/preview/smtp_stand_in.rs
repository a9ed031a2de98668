//! The dry run's stand-in for the SMTP server: takes every email on loopback and logs who it was for, so a dry run needs only RabbitMQ and Redis.
//!
//! The worker's own SMTP client talks to it (like the Slack stand-in, so
//! the email path is exercised as it runs in production). It speaks just
//! enough SMTP for one client: greeting, `EHLO`/`HELO`, `MAIL`, `RCPT`,
//! `DATA`, `RSET`, `NOOP`, `QUIT`; anything else gets `502`.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::redact::Addresses;

/// Largest message taken; the worker's emails are a few KiB.
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Starts the stand-in on `127.0.0.1:0`; answers `smtp://` + the address.
pub async fn start(
    addresses: Addresses,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(async move {
                            if let Err(e) = session(stream, addresses).await {
                                warn!(error = %e, "dry run: SMTP stand-in session ended");
                            }
                        });
                    }
                    Err(e) => warn!(error = %e, "dry run: SMTP stand-in cannot accept"),
                },
            }
        }
    });
    Ok(addr)
}

async fn session(stream: TcpStream, addresses: Addresses) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 alert-router dry run\r\n").await?;
    let mut recipients: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250 alert-router dry run\r\n"
        } else if command.starts_with("MAIL FROM:") {
            recipients.clear();
            b"250 ok\r\n"
        } else if command.starts_with("RCPT TO:") {
            let to = line.trim_end()[8..]
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string();
            recipients.push(to);
            b"250 ok\r\n"
        } else if command == "DATA" {
            write.write_all(b"354 end with .\r\n").await?;
            let mut size = 0;
            let mut subject = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line.trim_end() == "." {
                    break;
                }
                size += line.len();
                if subject.is_empty()
                    && let Some(value) = line.strip_prefix("Subject:")
                {
                    subject = value.trim().to_string();
                }
            }
            if size > MAX_MESSAGE_BYTES {
                b"552 too large\r\n"
            } else {
                let to: Vec<String> = recipients
                    .iter()
                    .map(|r| addresses.text(r).into_owned())
                    .collect();
                info!(to = %to.join(", "), %subject, "dry run: would email");
                recipients.clear();
                b"250 ok\r\n"
            }
        } else if command == "RSET" {
            recipients.clear();
            b"250 ok\r\n"
        } else if command == "NOOP" {
            b"250 ok\r\n"
        } else if command == "QUIT" {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}
