//! Unary requests sent as one DATA frame that ends the stream.
//!
//! tonic streams every request body, and hyper's HTTP/2 client cannot know that a unary
//! request's body ends after its one message: it sends HEADERS, then the message in a DATA
//! frame, then an empty DATA frame with END_STREAM, each flushed as it becomes ready (three
//! socket writes, and a task wakeup for each, per call). [`WholeRequests`] encodes the body
//! first and hands hyper a body that says it ends with its only chunk, so the message and
//! END_STREAM travel in one frame: two writes per call.
//!
//! ```text
//!  PodSyncClient ──► Credentials ──► WholeRequests: collect the encoded message ──► Channel
//! ```
//!
//! Only for services whose every method has a single request message (PodSync): a streaming
//! request (the Sync stream's ACKs) must keep flowing and never goes through here.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt as _, Full};
use tonic::body::Body;
use tower::Service;

/// Error of a call: the inner channel's, or the request's encoding.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A gRPC channel whose requests are each sent whole (see the module docs).
#[derive(Clone, Debug)]
pub struct WholeRequests<S> {
    inner: S,
}

impl<S> WholeRequests<S> {
    /// Wraps `inner`, a channel to a service whose methods take one request message each.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<http::Request<Body>> for WholeRequests<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is the one made ready; `self` keeps a fresh clone for the next call.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // A unary request's body is one encoded message, ready at once; an encoding error
            // (a message over the size limit) is the call's error, as tonic would report it.
            let message = body.collect().await?.to_bytes();
            let request = http::Request::from_parts(parts, Body::new(Full::new(message)));
            ready.call(request).await.map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    /// Per request: whether its first DATA frame ended the body, and the body's exact size.
    type Seen = Vec<(bool, Option<u64>)>;

    /// A channel that records what each request's body looked like when it arrived.
    #[derive(Clone, Default)]
    struct Recorder {
        seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    }

    impl Service<http::Request<Body>> for Recorder {
        type Response = http::Response<Body>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            let seen = self.seen.clone();
            Box::pin(async move {
                let mut body = request.into_body();
                let exact = body.size_hint().exact();
                let frame = body.frame().await.transpose()?;
                let ends_with_it = body.is_end_stream();
                assert!(frame.is_some_and(|f| f.is_data()), "one DATA frame");
                seen.lock().unwrap().push((ends_with_it, exact));
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    #[tokio::test]
    async fn a_request_s_body_is_one_chunk_that_ends_the_stream() {
        let recorder = Recorder::default();
        let mut service = WholeRequests::new(recorder.clone());
        // A body as tonic's encoder yields it: chunks, with no end known until the last poll.
        let chunks = futures::stream::iter([
            Ok::<_, tonic::Status>(http_body::Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\x05"))),
            Ok(http_body::Frame::data(bytes::Bytes::from_static(b"hello"))),
        ]);
        let streamed = Body::new(http_body_util::StreamBody::new(chunks));
        assert!(!streamed.is_end_stream());
        futures::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        service.call(http::Request::new(streamed)).await.unwrap();
        assert_eq!(*recorder.seen.lock().unwrap(), vec![(true, Some(10))]);
    }

    #[tokio::test]
    async fn a_body_that_fails_to_encode_fails_the_call_with_its_status() {
        let mut service = WholeRequests::new(Recorder::default());
        let failing = futures::stream::iter([Err::<http_body::Frame<bytes::Bytes>, _>(
            tonic::Status::out_of_range("message too large"),
        )]);
        let body = Body::new(http_body_util::StreamBody::new(failing));
        let error = service.call(http::Request::new(body)).await.unwrap_err();
        let status = tonic::Status::from_error(error);
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert_eq!(status.message(), "message too large");
    }
}
