//! The region's domain types: image, instance and copy states as enums (their text form lives
//! only here, for the SQL columns and logs), and the rows the metadata store reads and writes.

use imagefleet_proto::billing::v1 as billing;
use imagefleet_proto::region::v1 as pb;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// An enum stored as text: one table of `Variant => "TEXT"`, giving `as_str`, `parse` and the
/// SQL conversions, so no state is spelled anywhere else.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| {
                    FromSqlError::Other(format!("unknown {} {text:?}", stringify!($name)).into())
                })
            }
        }
    };
}

text_enum! {
    /// Where an image is in its life.
    ImageState {
        /// Admitted from an instance; its snapshot is frozen, the finish step is pending.
        Creating => "CREATING",
        Normal => "NORMAL",
        CreateFailed => "CREATEFAILED",
        /// Admitted as a copy; chunks are arriving from the source region.
        Syncing => "SYNCING",
        /// Admitted as an import; the file is being read into chunks.
        Importing => "IMPORTING",
        ImportFailed => "IMPORTFAILED",
        Deleting => "DELETING",
    }
}

text_enum! {
    /// How an image came to exist.
    ImageSource {
        Official => "OFFICIAL",
        CreateImage => "CREATE_IMAGE",
        ExternalImport => "EXTERNAL_IMPORT",
        Sync => "SYNC",
    }
}

text_enum! {
    /// An image's type as stored: public, or an account's own. (`SHARED_IMAGE` is how a
    /// receiver sees another account's private image, never stored.)
    ImageKind {
        Public => "PUBLIC_IMAGE",
        Private => "PRIVATE_IMAGE",
    }
}

text_enum! {
    InstanceState {
        Pending => "PENDING",
        Running => "RUNNING",
        Stopped => "STOPPED",
        Terminated => "TERMINATED",
    }
}

text_enum! {
    /// A copy into this region, on the destination side.
    CopyState {
        /// Chunks are being pulled (or waiting to retry).
        Running => "RUNNING",
        /// Every chunk is in and durable; the finish step is pending.
        Done => "DONE",
        Failed => "FAILED",
    }
}

text_enum! {
    /// What kind of source an image's lineage ends in, which decides its launch fee (the price
    /// book decides where WINDOWS is free).
    RootKind {
        Free => "FREE",
        Windows => "WINDOWS",
        Licensed => "LICENSED",
    }
}

impl RootKind {
    /// The kind of a root known only as paid or not, by its platform (rows and peers from
    /// before root kinds were kept).
    pub fn from_paid(paid: bool, platform: &str) -> RootKind {
        match (paid, platform == "Windows") {
            (false, _) => RootKind::Free,
            (true, true) => RootKind::Windows,
            (true, false) => RootKind::Licensed,
        }
    }
}

/// One image of a lineage chain: where it lives (empty: this region, for rows migrated from
/// before chains were kept) and whose it is (empty: public).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LineageLink {
    pub image_id: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub owner: String,
}

/// A lineage chain: the image first, its ultimate source last. Stored as JSON text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain(pub Vec<LineageLink>);

impl Chain {
    /// `first` followed by `rest`.
    pub fn derived(first: LineageLink, rest: &Chain) -> Chain {
        let mut links = Vec::with_capacity(rest.0.len() + 1);
        links.push(first);
        links.extend(rest.0.iter().cloned());
        Chain(links)
    }

    /// The ultimate source (the last link).
    pub fn root_image_id(&self) -> &str {
        self.0
            .last()
            .map(|l| l.image_id.as_str())
            .unwrap_or_default()
    }

    /// The chain as the billing service sees it, with `here` for links stored without a
    /// region.
    pub fn to_proto(&self, here: &str) -> Vec<billing::LineageLink> {
        self.0
            .iter()
            .map(|l| billing::LineageLink {
                image_id: l.image_id.clone(),
                region: if l.region.is_empty() {
                    here.to_string()
                } else {
                    l.region.clone()
                },
                owner_account_id: l.owner.clone(),
            })
            .collect()
    }

    pub fn from_proto(links: &[billing::LineageLink]) -> Chain {
        Chain(
            links
                .iter()
                .map(|l| LineageLink {
                    image_id: l.image_id.clone(),
                    region: l.region.clone(),
                    owner: l.owner_account_id.clone(),
                })
                .collect(),
        )
    }

    /// What launching an image with this chain and root kind costs, as billing is told.
    pub fn charge(&self, kind: RootKind, here: &str) -> billing::ImageCharge {
        billing::ImageCharge {
            image_id: self
                .0
                .first()
                .map(|l| l.image_id.clone())
                .unwrap_or_default(),
            chain: self.to_proto(here),
            root_image_id: self.root_image_id().to_string(),
            root_kind: kind.as_str().to_string(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "[]".to_string())
    }
}

impl ToSql for Chain {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.to_json()))
    }
}

impl FromSql for Chain {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        serde_json::from_str(text)
            .map(Chain)
            .map_err(|e| FromSqlError::Other(format!("lineage chain {text:?}: {e}").into()))
    }
}

impl ImageState {
    /// States whose content is still being filled: the image cannot be used or deleted the
    /// ordinary way yet.
    pub fn is_filling(self) -> bool {
        matches!(
            self,
            ImageState::Creating | ImageState::Syncing | ImageState::Importing
        )
    }

    pub fn to_proto(self) -> pb::ImageState {
        match self {
            ImageState::Creating => pb::ImageState::Creating,
            ImageState::Normal => pb::ImageState::Normal,
            ImageState::CreateFailed => pb::ImageState::Createfailed,
            ImageState::Syncing => pb::ImageState::Syncing,
            ImageState::Importing => pb::ImageState::Importing,
            ImageState::ImportFailed => pb::ImageState::Importfailed,
            ImageState::Deleting => pb::ImageState::Deleting,
        }
    }
}

impl ImageSource {
    pub fn to_proto(self) -> pb::ImageSource {
        match self {
            ImageSource::Official => pb::ImageSource::Official,
            ImageSource::CreateImage => pb::ImageSource::CreateImage,
            ImageSource::ExternalImport => pb::ImageSource::ExternalImport,
            ImageSource::Sync => pb::ImageSource::Sync,
        }
    }
}

impl InstanceState {
    pub fn to_proto(self) -> pb::InstanceState {
        match self {
            InstanceState::Pending => pb::InstanceState::Pending,
            InstanceState::Running => pb::InstanceState::Running,
            InstanceState::Stopped => pb::InstanceState::Stopped,
            InstanceState::Terminated => pb::InstanceState::Terminated,
        }
    }

    /// Whether a guest could be writing its disk.
    pub fn has_live_disk(self) -> bool {
        matches!(self, InstanceState::Running | InstanceState::Stopped)
    }
}

/// A new random id: `prefix` + `-` + 8 lowercase alphanumerics.
pub fn random_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..8)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}-{suffix}")
}

/// One image.
#[derive(Clone, Debug)]
pub struct ImageRow {
    pub image_id: String,
    /// Empty for public images.
    pub owner: String,
    pub name: String,
    pub description: String,
    pub kind: ImageKind,
    pub source: ImageSource,
    pub state: ImageState,
    /// Why a failed image failed, or what a copy is waiting for.
    pub state_reason: String,
    pub os_name: String,
    pub platform: String,
    pub architecture: String,
    pub virtual_size: u64,
    pub created_at: i64,
    pub snapshot_id: Option<String>,
    pub license_type: String,
    pub sync_percent: u32,
    pub parent_image_id: String,
    pub parent_region: String,
    /// The parent image's owner: this account for its own images and copies, the sharer for
    /// an image made from an instance launched from a shared image, empty for public parents.
    pub parent_owner: String,
    pub root_image_id: String,
    pub root_paid: bool,
    /// The image itself first, its ultimate source last (filled by admission for new custom
    /// images: a copy's row carries its source's chain until then).
    pub chain: Chain,
    pub root_kind: RootKind,
    /// Computed from the stored manifest by the finish step; empty before.
    pub content_digest: String,
    pub deprecated: bool,
    /// Bytes of non-zero chunks in the image's snapshot (joined in, not a column).
    pub stored_bytes: u64,
}

impl ImageRow {
    /// A new image of `owner` in `state`, with fresh image and snapshot ids; the caller fills
    /// in what it knows.
    pub fn new_custom(owner: &str, name: &str, source: ImageSource, state: ImageState) -> Self {
        ImageRow {
            image_id: random_id("img"),
            owner: owner.to_string(),
            name: name.to_string(),
            description: String::new(),
            kind: ImageKind::Private,
            source,
            state,
            state_reason: String::new(),
            os_name: String::new(),
            platform: String::new(),
            architecture: String::new(),
            virtual_size: 0,
            created_at: imagefleet_rpc::time::unix_now(),
            snapshot_id: Some(random_id("snap")),
            license_type: String::new(),
            sync_percent: 0,
            parent_image_id: String::new(),
            parent_region: String::new(),
            parent_owner: String::new(),
            root_image_id: String::new(),
            root_paid: false,
            chain: Chain::default(),
            root_kind: RootKind::Free,
            content_digest: String::new(),
            deprecated: false,
            stored_bytes: 0,
        }
    }

    pub fn is_public(&self) -> bool {
        self.kind == ImageKind::Public
    }
}

/// One instance.
#[derive(Clone, Debug)]
pub struct InstanceRow {
    pub instance_id: String,
    pub owner: String,
    pub name: String,
    pub instance_type: String,
    pub cpu: u32,
    pub memory_gib: u32,
    pub image_id: String,
    pub base_snapshot_id: Option<String>,
    pub disk_size: u64,
    pub state: InstanceState,
    pub created_at: i64,
    pub root_image_id: String,
    pub root_paid: bool,
    /// The owner of the image it was launched from (or last reset to): empty for a public
    /// image, another account for a shared one.
    pub image_owner: String,
    /// The lineage chain and root kind of that image: what the instance is charged for.
    pub chain: Chain,
    pub root_kind: RootKind,
}

/// A copy into this region (the destination side of `SyncImages`).
#[derive(Clone, Debug)]
pub struct CopyTask {
    pub image_id: String,
    /// Idempotency key: the same key admits the same copy once.
    pub request_key: String,
    pub source_region: String,
    pub source_image_id: String,
    /// The source snapshot the copy reads (pinned at the source for the copy's life).
    pub source_snapshot_id: String,
    /// The digest the source computed; the copy's own digest must equal it.
    pub expected_digest: String,
    pub state: CopyState,
    pub manifest_loaded: bool,
    pub chunks_total: u64,
    pub bytes_total: u64,
    pub chunks_done: u64,
    pub bytes_done: u64,
    pub chunks_transferred: u64,
    pub bytes_transferred: u64,
    pub attempts: u32,
    pub last_error: String,
    /// Unix seconds after which transient failures stop being retried.
    pub deadline_at: i64,
}

impl CopyTask {
    /// A copy not yet started: nothing fetched, no attempt made.
    pub fn new(
        request_key: &str,
        source_region: &str,
        source_image_id: &str,
        source_snapshot_id: &str,
        expected_digest: &str,
        deadline_at: i64,
    ) -> Self {
        CopyTask {
            image_id: String::new(),
            request_key: request_key.to_string(),
            source_region: source_region.to_string(),
            source_image_id: source_image_id.to_string(),
            source_snapshot_id: source_snapshot_id.to_string(),
            expected_digest: expected_digest.to_string(),
            state: CopyState::Running,
            manifest_loaded: false,
            chunks_total: 0,
            bytes_total: 0,
            chunks_done: 0,
            bytes_done: 0,
            chunks_transferred: 0,
            bytes_transferred: 0,
            attempts: 0,
            last_error: String::new(),
            deadline_at,
        }
    }
}

/// Progress of a copy, as last recorded.
#[derive(Clone, Copy, Debug, Default)]
pub struct CopyCounters {
    pub chunks_done: u64,
    pub bytes_done: u64,
    pub chunks_transferred: u64,
    pub bytes_transferred: u64,
}

/// A chunk manifest: `(chunk index, digest)` of every non-zero chunk, ascending index.
pub type Manifest = Vec<(u64, imagefleet_chunkstore::ChunkDigest)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip_and_match_the_proto_names() {
        for s in ImageState::ALL {
            assert_eq!(ImageState::parse(s.as_str()), Some(*s));
            assert_eq!(s.to_proto().as_str_name(), s.as_str());
        }
        for s in ImageSource::ALL {
            assert_eq!(ImageSource::parse(s.as_str()), Some(*s));
            assert_eq!(s.to_proto().as_str_name(), s.as_str());
        }
        for s in InstanceState::ALL {
            assert_eq!(InstanceState::parse(s.as_str()), Some(*s));
            assert_eq!(s.to_proto().as_str_name(), s.as_str());
        }
        assert_eq!(ImageState::parse("BOGUS"), None);
    }
}
