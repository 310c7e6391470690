//! The codec every generated client and server uses: prost's, with small starting buffers.
//!
//! tonic starts each call's encode and decode buffers at 8 KiB. A supernode holds one
//! long-lived scheduler stream per peer whose messages are tens of bytes; here the buffers start
//! at [`START`] and grow when a message needs more (measured with 4,000 simulated peers: 70 ->
//! 65 KiB of supernode RSS per session). The yield threshold, when an encoder hands its buffer to
//! the transport, stays tonic's.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Starting size of a call's encode and decode buffer.
pub const START: usize = 512;

/// tonic's yield threshold (32 KiB).
const YIELD: usize = 32 * 1024;

/// prost encoding with buffers that start at [`START`].
#[derive(Debug, Clone)]
pub struct SmallCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(START, YIELD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(START, YIELD))
    }
}
