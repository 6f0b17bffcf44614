//! The ESDK message decoder (the `gpulink-esdk` crate, `crates/esdk`), in two modes chosen by the first byte:
//!
//! * even: `[mode][32-byte data key][message]`: an arbitrary message is parsed and
//!   decrypted; whatever it holds, the answer is a value or an error, never a panic. The
//!   seeds are the Python ESDK's known-answer messages with their data keys, so mutations
//!   start from messages that authenticate.
//! * odd: `[mode][frame length][flip position: 2][flip mask][plaintext...]`: the plaintext
//!   is sealed under a fixed key, must open to itself, and after one byte is flipped (or
//!   the message truncated) must be refused: every byte of a message is authenticated.
//!
//! Shared by the cargo-fuzz target and the stable replay in `tests/suite/fuzz_replay.rs`.

use gpulink::seal::esdk::{self, EncryptedDataKey, EncryptionContext};

const KEY: [u8; 32] = [0x42; 32];

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        open_arbitrary(rest);
    } else {
        round_trip(rest);
    }
}

fn open_arbitrary(data: &[u8]) {
    let Some((key, message)) = data.split_first_chunk::<32>() else {
        return;
    };
    let Ok(header) = esdk::parse_header(message) else {
        return;
    };
    let context = header.context.clone();
    let opened = esdk::decrypt(key, &header, message);
    let expecting = esdk::decrypt_expecting_context(key, message, &context);
    // The two entry points judge the same message the same way.
    assert_eq!(opened.is_ok(), expecting.is_ok());
    if let (Ok(a), Ok(b)) = (&opened, &expecting) {
        assert_eq!(a, b);
    }
}

fn round_trip(data: &[u8]) {
    let [frame, flip_hi, flip_lo, mask, plaintext @ ..] = data else {
        return;
    };
    let frame_len = u32::from(*frame).max(1);
    let context: EncryptionContext = [
        ("model_pool".to_string(), "model-a".to_string()),
        ("tenant_id".to_string(), "tenant-fuzz".to_string()),
    ]
    .into_iter()
    .collect();
    let edks = [EncryptedDataKey {
        provider_id: "aws-kms".into(),
        provider_info: b"arn:aws:kms:us-east-1:111122223333:key/fuzz".to_vec(),
        ciphertext: vec![7; 40],
    }];
    let message = esdk::encrypt(&KEY, &edks, &context, plaintext, frame_len)
        .expect("sealing a bounded plaintext succeeds");
    let expected_len = esdk::sealed_len(&edks, &context, plaintext.len(), frame_len)
        .expect("sealed_len agrees with encrypt");
    assert_eq!(message.len(), expected_len);
    let opened =
        esdk::decrypt_expecting_context(&KEY, &message, &context).expect("a fresh message opens");
    assert_eq!(opened, plaintext);

    let position = usize::from(u16::from_be_bytes([*flip_hi, *flip_lo])) % message.len();
    if *mask != 0 {
        let mut altered = message.clone();
        altered[position] ^= mask;
        assert!(
            esdk::decrypt_expecting_context(&KEY, &altered, &context).is_err(),
            "a message with byte {position} flipped was accepted"
        );
    } else {
        assert!(
            esdk::decrypt_expecting_context(&KEY, &message[..position], &context).is_err(),
            "a message truncated to {position} bytes was accepted"
        );
    }
}
