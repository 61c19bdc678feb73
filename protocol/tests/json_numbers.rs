//! A float in a JSON frame decodes to the f64 its digits spell (correctly rounded), as it does
//! from MessagePack: a value a device writes reaches the table and other devices unchanged.
//! serde_json's default parser may be one ulp off for 17 significant digits or large exponents.

use protocol::codec::{self, Encoding};
use protocol::ClientFrame;

#[test]
fn json_floats_decode_to_the_value_their_digits_spell() {
    // Found by the frame_json fuzzer's round trip; the others: 0.1 + 0.2, and shortest forms
    // of random f64s that the default parser misread.
    for digits in ["1.0715660391465826e-75", "0.30000000000000004", "3.0261999441573203e-52", "6.466053826432699e-236", "1.0207044651451539e243"] {
        let frame = format!(
            r#"{{"type":"push","id":1,"batch_id":"0193304f-a001-7b3c-9d2e-1f0a2b3c4d01","changes":[{{"change_id":"0193304f-9e4b-7c61-a2d8-5b7c9e1f3b01","device_seq":1,"table":"t","op":"upsert","key":{{"id":"r1"}},"fields":{{"v":{digits}}},"hlc":{{"wall_ms":1,"counter":0}}}}]}}"#
        );
        let Ok(ClientFrame::Push { changes, .. }) = codec::decode_client(Encoding::Json, frame.as_bytes()) else { panic!("{frame}") };
        let decoded = changes[0].fields["v"].as_f64().expect("a number");
        let spelled: f64 = digits.parse().expect("Rust's parser rounds correctly");
        assert_eq!(decoded.to_bits(), spelled.to_bits(), "{digits} decoded as {decoded:e}");
    }
}
