//! Pages of an audience export as the crossing reads and writes them.
//!
//! Upstream pages arrive as bytes (`PageCodec`) and their members are read
//! in place ([`read_page`]): each field a slice of the page, so a member
//! costs the crossing no allocation per identifier, id or region before the
//! policy has even decided on it. Prost decodes into owned strings; for a
//! million members, seven allocations and frees each were a good part of
//! what the gateway added to an export. The reading uses prost's own wire
//! primitives and refuses anything that is not a well-formed page.

use bytes::{Buf, Bytes};
use madtech_proto::segments::export_page::MEMBERS_FIELD;
use madtech_proto::segments::v1 as segments_pb;
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};

/// Why an upstream page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("{0}")]
    Wire(#[from] DecodeError),
    #[error("a field runs past the end of the page")]
    Truncated,
    #[error("a string field is not UTF-8")]
    NotUtf8,
}

/// One member of an upstream page, borrowed from the page's bytes. The
/// fields are `AudienceMember`'s.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemberView<'a> {
    pub profile_id: &'a str,
    pub identifiers: Vec<IdentifierView<'a>>,
    pub region: &'a str,
    pub merged_profile_ids: Vec<&'a str>,
    pub birth_date: &'a str,
}

impl<'a> MemberView<'a> {
    /// A view of a member prost decoded (the audience change stream's).
    pub fn of(member: &'a segments_pb::AudienceMember) -> Self {
        MemberView {
            profile_id: &member.profile_id,
            identifiers: member
                .identifiers
                .iter()
                .map(|identifier| IdentifierView {
                    kind: &identifier.kind,
                    value: &identifier.value,
                })
                .collect(),
            region: &member.region,
            merged_profile_ids: member
                .merged_profile_ids
                .iter()
                .map(String::as_str)
                .collect(),
            birth_date: &member.birth_date,
        }
    }
}

/// An identifier as `madtech.profiles.v1.Identifier` carries it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct IdentifierView<'a> {
    pub kind: &'a str,
    pub value: &'a str,
}

/// The members of an encoded `ExportAudienceResponse`, in order.
pub fn read_page(mut page: &[u8]) -> Result<Vec<MemberView<'_>>, PageError> {
    let mut members = Vec::new();
    while !page.is_empty() {
        match decode_key(&mut page)? {
            (MEMBERS_FIELD, wire_type) => {
                members.push(read_member(length_delimited(wire_type, &mut page)?)?)
            }
            (tag, wire_type) => skip(tag, wire_type, &mut page)?,
        }
    }
    Ok(members)
}

fn read_member(mut fields: &[u8]) -> Result<MemberView<'_>, PageError> {
    let mut member = MemberView::default();
    while !fields.is_empty() {
        match decode_key(&mut fields)? {
            (1, wire_type) => member.profile_id = string(wire_type, &mut fields)?,
            (2, wire_type) => member
                .identifiers
                .push(read_identifier(length_delimited(wire_type, &mut fields)?)?),
            (3, wire_type) => member.region = string(wire_type, &mut fields)?,
            (6, wire_type) => member
                .merged_profile_ids
                .push(string(wire_type, &mut fields)?),
            (7, wire_type) => member.birth_date = string(wire_type, &mut fields)?,
            // The crossing's own fields (pseudonym, hashed identifiers)
            // are never read from upstream: they are made here.
            (tag, wire_type) => skip(tag, wire_type, &mut fields)?,
        }
    }
    Ok(member)
}

fn read_identifier(mut fields: &[u8]) -> Result<IdentifierView<'_>, PageError> {
    let mut identifier = IdentifierView::default();
    while !fields.is_empty() {
        match decode_key(&mut fields)? {
            (1, wire_type) => identifier.kind = string(wire_type, &mut fields)?,
            (2, wire_type) => identifier.value = string(wire_type, &mut fields)?,
            (tag, wire_type) => skip(tag, wire_type, &mut fields)?,
        }
    }
    Ok(identifier)
}

fn length_delimited<'a>(wire_type: WireType, buf: &mut &'a [u8]) -> Result<&'a [u8], PageError> {
    prost::encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
    let len = usize::try_from(decode_varint(buf)?).unwrap_or(usize::MAX);
    if len > buf.len() {
        return Err(PageError::Truncated);
    }
    let (value, rest) = buf.split_at(len);
    *buf = rest;
    Ok(value)
}

fn string<'a>(wire_type: WireType, buf: &mut &'a [u8]) -> Result<&'a str, PageError> {
    std::str::from_utf8(length_delimited(wire_type, buf)?).map_err(|_| PageError::NotUtf8)
}

fn skip(tag: u32, wire_type: WireType, buf: &mut &[u8]) -> Result<(), PageError> {
    Ok(skip_field(wire_type, tag, buf, DecodeContext::default())?)
}

/// Calls `ExportAudience` upstream and hands each page over as its bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct PageCodec;

impl Codec for PageCodec {
    type Encode = segments_pb::ExportAudienceRequest;
    type Decode = Bytes;
    type Encoder = tonic_prost::ProstEncoder<segments_pb::ExportAudienceRequest>;
    type Decoder = PageDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        PageDecoder
    }
}

/// Takes a message's bytes as they are (split off tonic's buffer, not
/// copied); [`read_page`] reads them.
#[derive(Debug, Default)]
pub struct PageDecoder;

impl Decoder for PageDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use madtech_proto::profiles::v1::Identifier;
    use prost::Message;

    use super::*;

    fn member(id: &str) -> segments_pb::AudienceMember {
        segments_pb::AudienceMember {
            profile_id: id.into(),
            identifiers: vec![
                Identifier {
                    kind: "email".into(),
                    value: format!("{id}@example.com"),
                },
                Identifier {
                    kind: "phone".into(),
                    value: "+33612345678".into(),
                },
            ],
            region: "FR".into(),
            pseudonymous_id: "ignored".into(),
            hashed_identifiers: vec![segments_pb::HashedIdentifier {
                kind: "email".into(),
                sha256: "ignored".into(),
                form: "sha256".into(),
            }],
            merged_profile_ids: vec![format!("{id}-a"), format!("{id}-b")],
            birth_date: "1990-01-31".into(),
        }
    }

    #[test]
    fn a_page_reads_as_prost_decodes_it() {
        let members = vec![
            member("a"),
            member("b"),
            segments_pb::AudienceMember::default(),
        ];
        let page = segments_pb::ExportAudienceResponse::of(members.clone()).encode_to_vec();
        let read = read_page(&page).expect("a page");
        assert_eq!(read.len(), 3);
        for (view, member) in read.iter().zip(&members) {
            assert_eq!(view.profile_id, member.profile_id);
            assert_eq!(view.region, member.region);
            assert_eq!(view.birth_date, member.birth_date);
            let identifiers: Vec<_> = view
                .identifiers
                .iter()
                .map(|i| (i.kind.to_string(), i.value.to_string()))
                .collect();
            let expected: Vec<_> = member
                .identifiers
                .iter()
                .map(|i| (i.kind.clone(), i.value.clone()))
                .collect();
            assert_eq!(identifiers, expected);
            assert_eq!(view.merged_profile_ids, member.merged_profile_ids);
        }
        assert_eq!(read_page(&[]).expect("an empty page"), Vec::new());
    }

    #[test]
    fn a_decoded_member_reads_as_its_page_form() {
        let decoded = member("p1");
        let page = segments_pb::ExportAudienceResponse::of(vec![decoded.clone()]).encode_to_vec();
        let read = read_page(&page).expect("a page");
        assert_eq!(read, vec![MemberView::of(&decoded)]);
    }

    #[test]
    fn a_bad_page_is_an_error_never_a_panic() {
        let page = segments_pb::ExportAudienceResponse::of(vec![member("a")]).encode_to_vec();
        for cut in 0..page.len() {
            // Every prefix either reads (it ends between members) or fails.
            let _ = read_page(&page[..cut]);
        }
        assert!(read_page(&page[..page.len() - 1]).is_err());
        // A profile id that is not UTF-8.
        assert!(read_page(&[0x0a, 0x03, 0x0a, 0x01, 0xff]).is_err());
        // Field 1 with the wrong wire type.
        assert!(read_page(&[0x08, 0x01]).is_err());
        // A length beyond the page.
        assert!(read_page(&[0x0a, 0x7f]).is_err());
    }
}
