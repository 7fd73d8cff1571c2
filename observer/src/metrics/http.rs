//! The `/metrics` endpoint: hyper's HTTP/1 server on the daemon's own
//! (current-thread) runtime. The Prometheus text format (0.0.4) by default,
//! OpenMetrics when the scraper's Accept header asks for it (Prometheus does).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{prometheus_text, text},
    registry::Registry,
};
use tokio::sync::Semaphore;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// A client that has not sent its request by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the listener, at start-up: a port that cannot be had is one line
/// naming the flag (`--metrics 127.0.0.1:80: address in use`).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let why = |e: std::io::Error| {
        use std::io::ErrorKind::*;
        let what = match e.kind() {
            AddrInUse => "address in use".to_owned(),
            AddrNotAvailable => "address not available (no interface has it)".to_owned(),
            PermissionDenied => "permission denied".to_owned(),
            _ => e.to_string(),
        };
        anyhow!("--metrics {addr}: {what}")
    };
    let l = std::net::TcpListener::bind(addr).map_err(why)?;
    l.set_nonblocking(true).map_err(why)?;
    Ok(l)
}

/// Serves `/metrics` from `registry` on a task of the current runtime.
pub fn spawn(listener: std::net::TcpListener, registry: Arc<Registry>) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener).context("--metrics: polling")?;
    if let Ok(a) = listener.local_addr() {
        log::info!("metrics at http://{a}/metrics");
    }
    tokio::spawn(serve(listener, registry));
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: say so, and give it a moment.
                log::warn!("--metrics: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = respond(&req, &registry);
                async move { Ok::<_, Infallible>(resp) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = served {
                log::debug!("--metrics: a connection ended: {e}");
            }
            drop(slot);
        });
    }
}

fn respond<B>(req: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, kind)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    let plain = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            plain,
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            plain,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let mut body = String::with_capacity(16 << 10);
    let (kind, encoded) = if wants_openmetrics(accept) {
        (OPENMETRICS, text::encode(&mut body, registry))
    } else {
        (
            prometheus_text::CONTENT_TYPE,
            prometheus_text::encode(&mut body, registry),
        )
    };
    match encoded {
        Ok(()) => reply(StatusCode::OK, kind, body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            plain,
            format!("encoding the metrics: {e}\n"),
        ),
    }
}

/// OpenMetrics when the client lists it (Prometheus puts it first); the
/// classic text format for everyone else (curl, promtool).
fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut p = part.split(';').map(str::trim);
            p.next() == Some("application/openmetrics-text")
                && p.all(|param| param.replace(' ', "") != "q=0")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_chooses_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn only_metrics_is_served() {
        let registry = Registry::default();
        let get = |path: &str, accept: Option<&str>| {
            let mut b = Request::get(path);
            if let Some(a) = accept {
                b = b.header(header::ACCEPT, a);
            }
            respond(&b.body(()).unwrap(), &registry)
        };
        assert_eq!(get("/", None).status(), StatusCode::NOT_FOUND);
        let r = get("/metrics", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            prometheus_text::CONTENT_TYPE
        );
        let r = get("/metrics", Some("application/openmetrics-text"));
        assert_eq!(r.headers()[header::CONTENT_TYPE], OPENMETRICS);
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(
            respond(&post, &registry).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn a_port_in_use_is_one_line_naming_the_flag() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let e = bind(addr).unwrap_err().to_string();
        assert_eq!(e, format!("--metrics {addr}: address in use"));
    }
}
