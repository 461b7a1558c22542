//! `madtech.segments.v1.ExportAudienceResponse`, written by hand rather than
//! generated, so that a page can carry members that were encoded before the
//! page was built.
//!
//! The segments service stores each person as the `AudienceMember` an export
//! sends, already framed as a `members` entry (field 1: key, length, message).
//! A page of such entries placed one after another *is* the page's encoding,
//! so the service sends the bytes its database concatenated instead of
//! decoding a thousand members and encoding them again. On the wire nothing
//! differs from the generated message: every receiver decodes `members`.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use super::v1::AudienceMember;

/// A page of an audience export.
#[derive(Clone, Default, PartialEq)]
pub struct ExportAudienceResponse {
    /// Field 1, `repeated AudienceMember members`: the page's members. A
    /// decoded page has all of them here.
    pub members: Vec<AudienceMember>,
    /// More `members` entries, already encoded (each one field 1's key, a
    /// length and an encoded `AudienceMember`), sent after `members` as they
    /// are. Never filled by decoding; whoever fills it vouches that it is a
    /// run of well-formed entries.
    pub encoded_members: Bytes,
}

impl ExportAudienceResponse {
    /// A page of decoded members.
    pub fn of(members: Vec<AudienceMember>) -> Self {
        ExportAudienceResponse {
            members,
            encoded_members: Bytes::new(),
        }
    }

    /// A page of members already encoded as `members` entries.
    pub fn encoded(encoded_members: Bytes) -> Self {
        ExportAudienceResponse {
            members: Vec::new(),
            encoded_members,
        }
    }
}

/// Members are personal data: their count and size are enough for logs.
impl std::fmt::Debug for ExportAudienceResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportAudienceResponse")
            .field("members", &self.members.len())
            .field("encoded_members_bytes", &self.encoded_members.len())
            .finish()
    }
}

/// The field that holds a page's members; an `encoded_members` entry
/// starts with its key.
pub const MEMBERS_FIELD: u32 = 1;

/// Appends `member` to `buf` as one `encoded_members` entry (key, length,
/// message).
pub fn encode_member(member: &AudienceMember, buf: &mut impl BufMut) {
    encoding::message::encode(MEMBERS_FIELD, member, buf);
}

impl Message for ExportAudienceResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(MEMBERS_FIELD, &self.members, buf);
        buf.put_slice(&self.encoded_members);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            MEMBERS_FIELD => {
                encoding::message::merge_repeated(wire_type, &mut self.members, buf, ctx).map_err(
                    |mut err| {
                        err.push("ExportAudienceResponse", "members");
                        err
                    },
                )
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(MEMBERS_FIELD, &self.members)
            + self.encoded_members.len()
    }

    fn clear(&mut self) {
        self.members.clear();
        self.encoded_members = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::super::v1::HashedIdentifier;
    use super::*;
    use crate::profiles::v1::Identifier;

    fn member(id: &str) -> AudienceMember {
        AudienceMember {
            profile_id: id.into(),
            identifiers: vec![Identifier {
                kind: "email".into(),
                value: format!("{id}@example.com"),
            }],
            region: "FR".into(),
            pseudonymous_id: String::new(),
            hashed_identifiers: vec![HashedIdentifier {
                kind: "email".into(),
                sha256: "00".repeat(32),
                form: "sha256".into(),
            }],
            merged_profile_ids: vec![format!("{id}-old")],
            birth_date: "1990-01-31".into(),
        }
    }

    fn entry(member: &AudienceMember) -> Vec<u8> {
        let mut framed = Vec::new();
        encode_member(member, &mut framed);
        framed
    }

    #[test]
    fn encoded_members_decode_after_the_decoded_ones() {
        let encoded: Vec<u8> = [member("b"), member("c")].iter().flat_map(entry).collect();
        let page = ExportAudienceResponse {
            members: vec![member("a")],
            encoded_members: Bytes::from(encoded),
        };
        let bytes = page.encode_to_vec();
        assert_eq!(bytes.len(), page.encoded_len());
        let decoded = ExportAudienceResponse::decode(bytes.as_slice()).expect("a page");
        assert_eq!(
            decoded,
            ExportAudienceResponse::of(vec![member("a"), member("b"), member("c")])
        );
    }

    #[test]
    fn unknown_fields_are_skipped_and_a_cut_page_is_an_error() {
        let mut bytes = vec![0x10, 0x07]; // field 2, varint 7: not ours
        bytes.extend(entry(&member("a")));
        let decoded = ExportAudienceResponse::decode(bytes.as_slice()).expect("a page");
        assert_eq!(decoded.members, vec![member("a")]);
        assert!(ExportAudienceResponse::decode(&bytes[..bytes.len() - 2]).is_err());
    }

    #[test]
    fn debug_shows_no_member() {
        let page = ExportAudienceResponse::of(vec![member("a")]);
        let shown = format!("{page:?}");
        assert!(!shown.contains("example.com"), "{shown}");
    }
}
