//! The Sync method's responses, framed without tonic's per-stream encode buffer.
//!
//! ```text
//!  h2 request ──► SyncFraming ──/rcsync.v1.RuntimeClassSync/Sync──► RuntimeClassSyncService::open_sync
//!                     │                                                      │ Stream<SharedSyncResponse>
//!                     │ any other path                                       ▼
//!                     ▼                                       FramedResponses: one Bytes per message
//!            RuntimeClassSyncServer (tonic codegen)            (5-byte gRPC header + protobuf),
//!                                                              grpc-status in the trailers
//! ```
//!
//! Why: tonic encodes a streaming response into one `BytesMut` per stream and splits each message
//! off it; once the message is written, the buffer takes the whole allocation back and keeps it for
//! as long as the stream lives. The first Sync response carries a tenant's whole state in one
//! message (about 1 MB for 10,000 classes), so every open stream held on to about 1 MB it would not
//! use again. Here each message gets an allocation of its exact size, freed once h2 has written it:
//! an idle stream costs its session, not its largest message. The message is encoded straight from
//! the view's shared resources ([`SharedSyncResponse`]), with no copy of them per stream. Requests
//! (ACKs and NACKs, small) are
//! still decoded by tonic, and every other method goes through the generated server unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body::Frame;
use rcsync_proto::v1::runtime_class_sync_server::RuntimeClassSyncServer;
use rcsync_proto::v1::{SyncRequest, SyncResponse};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::server::NamedService;

use crate::grpc::sync::{RuntimeClassSyncService, SYNC as SYNC_PATH, SharedSyncResponse};
use crate::index::ViewSource;

/// Compressed-flag byte and length of a gRPC message frame.
const FRAME_HEADER: usize = 5;

/// The RuntimeClassSync service with Sync's responses framed by [`FramedResponses`].
pub struct SyncFraming<V> {
    service: Arc<RuntimeClassSyncService<V>>,
    generated: RuntimeClassSyncServer<RuntimeClassSyncService<V>>,
}

impl<V: ViewSource> SyncFraming<V> {
    /// Serves `service`: Sync framed here, CheckPod through the generated server.
    pub fn new(service: RuntimeClassSyncService<V>) -> Self {
        let service = Arc::new(service);
        Self {
            generated: RuntimeClassSyncServer::from_arc(service.clone())
                .max_decoding_message_size(rcsync_proto::MAX_REQUEST_BYTES),
            service,
        }
    }
}

impl<V> Clone for SyncFraming<V> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            generated: self.generated.clone(),
        }
    }
}

impl<V> NamedService for SyncFraming<V> {
    const NAME: &'static str = <RuntimeClassSyncServer<()> as NamedService>::NAME;
}

impl<V, B> tower::Service<http::Request<B>> for SyncFraming<V>
where
    V: ViewSource,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SYNC_PATH {
            return self.generated.call(request);
        }
        let service = self.service.clone();
        Box::pin(async move { Ok(sync(service, request).await) })
    }
}

/// One Sync call: the request stream decoded by tonic, the responses framed here.
async fn sync<V, B>(
    service: Arc<RuntimeClassSyncService<V>>,
    request: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    V: ViewSource,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    // Neither side compresses: the server advertises no encoding, so a client that compresses
    // anyway gets what tonic answers for an unsupported one.
    if let Some(encoding) = request.headers().get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
    {
        return Status::unimplemented(format!(
            "grpc-encoding {} is not supported by this server (it accepts identity)",
            String::from_utf8_lossy(encoding.as_bytes())
        ))
        .into_http();
    }
    let (parts, body) = request.into_parts();
    let mut codec = tonic_prost::ProstCodec::<SyncResponse, SyncRequest>::default();
    let inbound = tonic::Streaming::new_request(
        SmallBuffer(codec.decoder()),
        body,
        None,
        Some(rcsync_proto::MAX_REQUEST_BYTES),
    );
    let request = tonic::Request::from_http(http::Request::from_parts(parts, inbound));
    match service.open_sync(request).await {
        Err(status) => status.into_http(),
        Ok(response) => {
            let (metadata, messages, extensions) = response.into_parts();
            let mut response = http::Response::new(tonic::body::Body::new(FramedResponses::new(messages)));
            *response.headers_mut() = metadata.into_headers();
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            *response.extensions_mut() = extensions;
            response
        }
    }
}

/// A decoder with a small first buffer. Sync requests are ACKs and NACKs (a nonce, at most an
/// error message): tonic's default 8 KiB per stream is 8 MiB of mostly empty buffers at 1,000
/// streams. The buffer grows when a larger message arrives.
struct SmallBuffer<D>(D);

/// The first size of a Sync stream's request buffer.
const REQUEST_BUFFER: usize = 256;

impl<D: Decoder> Decoder for SmallBuffer<D> {
    type Item = D::Item;
    type Error = D::Error;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(REQUEST_BUFFER, 32 * 1024)
    }
}

/// A response body of gRPC messages, each framed into a buffer of its own size, ended by the
/// trailers of the stream's status (OK when the stream ends, the error when it yields one).
pub struct FramedResponses<S> {
    messages: S,
    ended: bool,
}

impl<S> FramedResponses<S> {
    /// Frames `messages`.
    pub fn new(messages: S) -> Self {
        Self {
            messages,
            ended: false,
        }
    }
}

impl<S> http_body::Body for FramedResponses<S>
where
    S: Stream<Item = Result<SharedSyncResponse, Status>> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match ready!(Pin::new(&mut self.messages).poll_next(cx)) {
            Some(Ok(message)) => match frame(&message) {
                Ok(bytes) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unrepresentable) = status.add_header(&mut trailers) {
            // Only a message that is not a valid header value gets here: send the code alone.
            Status::new(unrepresentable.code(), "")
                .add_header(&mut trailers)
                .ok();
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// One message as a gRPC frame: uncompressed flag, big-endian length, the protobuf encoding.
fn frame(message: &SharedSyncResponse) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let header_len = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!(
            "a response of {len} bytes does not fit in one gRPC message"
        ))
    })?;
    let mut buf = BytesMut::with_capacity(FRAME_HEADER + len);
    buf.put_u8(0);
    buf.put_u32(header_len);
    message.encode_raw(&mut buf);
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prost::Message;
    use rcsync_proto::v1::Resource;

    fn response(names: &[&str]) -> SharedSyncResponse {
        SharedSyncResponse {
            head: SyncResponse {
                nonce: "1".into(),
                removed_resources: vec!["old".into()],
                initial_state_complete: true,
                ..Default::default()
            },
            resources: names
                .iter()
                .map(|n| {
                    Arc::new(Resource {
                        name: (*n).into(),
                        version: format!("v-{n}"),
                        ..Default::default()
                    })
                })
                .collect(),
        }
    }

    /// What a gRPC client reads from `body`: the messages, then the trailers.
    async fn read<S>(body: FramedResponses<S>) -> (Vec<SyncResponse>, http::HeaderMap)
    where
        S: Stream<Item = Result<SharedSyncResponse, Status>> + Unpin,
    {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        let mut data = collected.to_bytes();
        let mut messages = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 0, "uncompressed");
            let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
            messages.push(SyncResponse::decode(&data[5..5 + len]).unwrap());
            data = data.slice(5 + len..);
        }
        (messages, trailers)
    }

    #[tokio::test]
    async fn messages_decode_as_the_sync_responses_they_stand_for_and_an_ended_stream_trails_ok() {
        let expected = vec![
            response(&["gvisor", "kata"]).into_message(),
            response(&[]).into_message(),
        ];
        let sent = [response(&["gvisor", "kata"]), response(&[])];
        let body = FramedResponses::new(futures::stream::iter(sent.into_iter().map(Ok)));
        let (messages, trailers) = read(body).await;
        assert_eq!(messages, expected);
        assert_eq!(messages[0].resources[1].name, "kata");
        assert_eq!(messages[0].removed_resources, ["old"]);
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn an_error_ends_the_body_with_its_status() {
        let items = vec![
            Ok(response(&["gvisor"])),
            Err(Status::unavailable("the host agent is shutting down")),
            Ok(response(&["never sent"])),
        ];
        let (messages, trailers) = read(FramedResponses::new(futures::stream::iter(items))).await;
        assert_eq!(messages, vec![response(&["gvisor"]).into_message()]);
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(
            trailers["grpc-message"],
            "the%20host%20agent%20is%20shutting%20down"
        );
    }

    #[test]
    fn each_message_gets_a_buffer_of_its_own_size() {
        let message = response(&["gvisor"; 1000]);
        let bytes = frame(&message).unwrap();
        assert_eq!(bytes.len(), FRAME_HEADER + message.encoded_len());
        assert_eq!(message.encoded_len(), message.into_message().encoded_len());
    }
}
