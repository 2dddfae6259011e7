//! The codec of every generated client and server: prost's, except that a message that does not
//! decode (a bad varint, a string that is not UTF-8, a truncated field) is `INVALID_ARGUMENT`
//! with reason `InvalidParameter.MalformedBody`, not prost's `INTERNAL` without an `ErrorInfo`:
//! a malformed request is the caller's mistake, and says so in the project's error model.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The reason of a message that does not decode.
pub const MALFORMED_BODY: &str = "InvalidParameter.MalformedBody";

/// prost's codec with decoding failures mapped to `INVALID_ARGUMENT` (named in `build.rs` as the
/// generated code's `codec_path`).
#[derive(Debug, Clone)]
pub struct ImagefleetCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for ImagefleetCodec<T, U> {
    fn default() -> Self {
        ImagefleetCodec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ImagefleetCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MalformedIsInvalid<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MalformedIsInvalid {
            inner: self.inner.decoder(),
        }
    }
}

/// prost's decoder, answering a message that does not decode with `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct MalformedIsInvalid<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for MalformedIsInvalid<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost reports its decode errors as INTERNAL with the text of the error; every other
        // status (none today) passes through.
        self.inner.decode(buf).map_err(|status| {
            if status.code() == Code::Internal {
                malformed(status.message())
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// `INVALID_ARGUMENT` `InvalidParameter.MalformedBody` for a message that did not decode.
pub fn malformed(why: &str) -> Status {
    crate::error::status(
        Code::InvalidArgument,
        MALFORMED_BODY,
        format!("the message is not valid protobuf for this method: {why}"),
    )
}
