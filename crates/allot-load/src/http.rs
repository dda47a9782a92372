//! One client's HTTP/1.1 connection: keep-alive, reconnect after an error, nothing shared.
//!
//! Each simulated client owns one TCP connection, so `--clients 256` means exactly 256
//! concurrent connections, and the generator spends as little CPU per request as hyper allows
//! (it shares the machine with the server it measures).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// A request that takes longer than this counts as a transport error (status 0).
const REQUEST_TIMEOUT_SECONDS: u64 = 30;

/// Where the server listens, parsed once from `--url`.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
}

impl Target {
    pub async fn parse(url: &str) -> anyhow::Result<Target> {
        let Some(rest) = url.strip_prefix("http://") else { bail!("--url must start with http:// (got {url})") };
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.contains('/') {
            bail!("--url must be the server's root, e.g. http://127.0.0.1:8080 (got {url})");
        }
        let addr = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        Ok(Target { addr, authority })
    }
}

/// The answer to one request: status (0 for a transport error) and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

pub struct Conn {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(target: Target) -> Conn {
        Conn { target, sender: None }
    }

    /// Sends one request; a broken connection is dropped and the next request reconnects.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        let request = self.try_send(method, path, token, idempotency_key, body);
        let outcome = tokio::time::timeout(Duration::from_secs(REQUEST_TIMEOUT_SECONDS), request).await;
        match outcome {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) | Err(_) => {
                self.sender = None;
                Answer { status: 0, body: Bytes::new() }
            }
        }
    }

    async fn try_send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        let mut request = Request::builder().method(method).uri(path).header("host", &self.target.authority);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let request = match body {
            Some(body) => request.header("content-type", "application/json").body(Full::new(Bytes::from(body)))?,
            None => request.body(Full::new(Bytes::new()))?,
        };
        let sender = self.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer { status, body })
    }

    /// Opens the connection now (else the first request does).
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        self.ready().await.map(|_| ())
    }

    async fn ready(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.target.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().context("connection just made")?;
        sender.ready().await?;
        Ok(sender)
    }
}
