//! The HTTP stack under the server: what Keyward relies on hyper to do (or not to do).

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts the wake-ups of the task it is the waker of.
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A request whose body arrives with its head is answered in one poll of its connection, which
/// then waits for the next request without having woken itself. hyper 1.12.0 woke the
/// connection's task when the handler took the body (from a body channel whose sender was
/// already gone), so every verification polled its connection twice, the second time after a
/// trip through the runtime's queue: vendor/hyper carries the fix (vendor/README.md). If a hyper
/// upgrade makes this fail, keep the fix.
#[tokio::test]
async fn a_body_that_arrives_whole_does_not_wake_its_connection_again() {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let echo = hyper::service::service_fn(|req: Request<Incoming>| async move {
        let body = req.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>(Response::new(Full::<Bytes>::new(body)))
    });
    let mut conn = pin!(
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), echo)
    );
    let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);

    for i in 0..3 {
        let body = format!("{{\"key\":\"kw_ak_{i}\"}}");
        let request = format!(
            "POST /v1/keys/verify HTTP/1.1\r\nhost: keyward\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        client
            .write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let before = wakes.0.load(Ordering::SeqCst);
        assert!(
            conn.as_mut().poll(&mut cx).is_pending(),
            "the connection closed"
        );
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            before,
            "request {i}: the connection woke itself while answering"
        );
        let mut answer = vec![0u8; 4096];
        let n = client
            .read(&mut answer)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            answer.ends_with(&body),
            "the answer is all there in one poll: {answer}"
        );
    }
}
