//! The MadTech protobuf API: messages, tonic clients and servers for every
//! service, and the encoded file descriptor set that the reflection service
//! serves.
//!
//! Generated types stay at the edge: services convert them to their own domain
//! types in their `service.rs`.

/// `madtech.profiles.v1`
pub mod profiles {
    pub mod v1 {
        tonic::include_proto!("madtech.profiles.v1");
    }
}

/// `madtech.consent.v1`
pub mod consent {
    pub mod v1 {
        tonic::include_proto!("madtech.consent.v1");
    }

    /// The ledger purpose under which a TC string's consent for one IAB TCF
    /// vendor (by Global Vendor List id) is recorded, so the gateway can ask
    /// for it like any purpose.
    pub fn tcf_vendor_purpose(vendor_id: u16) -> String {
        format!("{TCF_VENDOR_PURPOSE_PREFIX}{vendor_id}")
    }

    /// What every [`tcf_vendor_purpose`] starts with.
    pub const TCF_VENDOR_PURPOSE_PREFIX: &str = "tcf_vendor_";
}

/// `madtech.segments.v1`
pub mod segments {
    pub mod v1 {
        tonic::include_proto!("madtech.segments.v1");

        pub use super::export_page::ExportAudienceResponse;
    }

    pub mod export_page;

    /// The response header in which the gateway names the policy version
    /// an `ExportAudience` crossing was decided under.
    pub const POLICY_VERSION_HEADER: &str = "x-madtech-policy-version";

    /// The response header in which `ExportAudience` of the current
    /// membership names the membership cursor it includes everything up to.
    pub const MEMBERSHIP_CURSOR_HEADER: &str = "x-madtech-membership-cursor";

    /// The most profile ids, and the most identifiers, one
    /// `GetPersonRecords` call takes; a caller with more sends several.
    pub const MAX_PERSON_RECORD_KEYS: usize = 100;
}

/// `madtech.activation.v1`
pub mod activation {
    pub mod v1 {
        tonic::include_proto!("madtech.activation.v1");
    }

    /// The most identifier hashes one `FindDeliveries` or `ForgetPeople`
    /// call takes; a caller with more sends them in several calls.
    pub const MAX_IDENTIFIER_HASHES: usize = 100;
}

/// `madtech.gateway.v1`
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("madtech.gateway.v1");
    }
}

/// The encoded `FileDescriptorSet` of every MadTech proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("madtech_descriptor");

/// Converts between `prost_types::Timestamp` and `std::time::SystemTime`-free
/// Unix representations; kept here because every service needs it at its edge.
pub mod time {
    pub use prost_types::Timestamp;

    /// A timestamp from Unix microseconds.
    pub fn from_micros(micros: i64) -> Timestamp {
        Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
        }
    }

    /// A duration in microseconds, saturating at `i64::MAX` (the policies
    /// write lifetimes and waits as durations; times are stored as
    /// microseconds).
    pub fn duration_micros(duration: std::time::Duration) -> i64 {
        i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
    }

    /// Unix microseconds from a timestamp, or `None` when its nanos are out of
    /// range or the value overflows.
    pub fn to_micros(ts: &Timestamp) -> Option<i64> {
        if !(0..1_000_000_000).contains(&ts.nanos) {
            return None;
        }
        ts.seconds
            .checked_mul(1_000_000)?
            .checked_add(i64::from(ts.nanos / 1_000))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn micros_round_trip_including_before_epoch() {
            for micros in [0, 1, -1, 1_700_000_000_123_456, -1_500_000] {
                assert_eq!(to_micros(&from_micros(micros)), Some(micros));
            }
        }

        #[test]
        fn out_of_range_nanos_are_rejected() {
            let ts = Timestamp {
                seconds: 1,
                nanos: 1_000_000_000,
            };
            assert_eq!(to_micros(&ts), None);
        }
    }
}
