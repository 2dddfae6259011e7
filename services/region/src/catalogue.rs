//! Fixed catalogues of the region: instance types, and the public images every region is
//! seeded with.

/// An instance type: family and size, e.g. `S5.MEDIUM4` is 2 vCPU and 4 GiB.
#[derive(Clone, Copy, Debug)]
pub struct InstanceType {
    pub name: &'static str,
    pub cpu: u32,
    pub memory_gib: u32,
}

pub const INSTANCE_TYPES: &[InstanceType] = &[
    InstanceType {
        name: "S5.SMALL1",
        cpu: 1,
        memory_gib: 1,
    },
    InstanceType {
        name: "S5.SMALL2",
        cpu: 1,
        memory_gib: 2,
    },
    InstanceType {
        name: "S5.MEDIUM2",
        cpu: 2,
        memory_gib: 2,
    },
    InstanceType {
        name: "S5.MEDIUM4",
        cpu: 2,
        memory_gib: 4,
    },
    InstanceType {
        name: "S5.LARGE8",
        cpu: 4,
        memory_gib: 8,
    },
    InstanceType {
        name: "S5.2XLARGE16",
        cpu: 8,
        memory_gib: 16,
    },
    InstanceType {
        name: "S5.4XLARGE32",
        cpu: 16,
        memory_gib: 32,
    },
    InstanceType {
        name: "SA2.MEDIUM4",
        cpu: 2,
        memory_gib: 4,
    },
    InstanceType {
        name: "SA2.LARGE8",
        cpu: 4,
        memory_gib: 8,
    },
    InstanceType {
        name: "M5.LARGE32",
        cpu: 4,
        memory_gib: 32,
    },
    InstanceType {
        name: "C5.LARGE8",
        cpu: 4,
        memory_gib: 8,
    },
];

pub fn instance_type(name: &str) -> Option<InstanceType> {
    INSTANCE_TYPES.iter().copied().find(|t| t.name == name)
}

impl InstanceType {
    /// The family: the part of the name before the dot (`S5` of `S5.MEDIUM4`).
    pub fn family(&self) -> &'static str {
        self.name
            .split_once('.')
            .map_or(self.name, |(family, _)| family)
    }
}

/// The instance types in the order they are listed: by family, then by CPU and memory.
pub fn instance_types_listed() -> Vec<InstanceType> {
    let mut types = INSTANCE_TYPES.to_vec();
    types.sort_by_key(|t| (t.family(), t.cpu, t.memory_gib));
    types
}

/// A public image definition. Content is generated from `name`, so every region holds the
/// same bytes.
#[derive(Clone, Copy, Debug)]
pub struct PublicImage {
    pub name: &'static str,
    pub os_name: &'static str,
    pub platform: &'static str,
    pub architecture: &'static str,
    pub virtual_size_mib: u64,
    /// MBR partition type of the root partition (0x83 Linux, 0x07 NTFS).
    pub partition_type: u8,
    /// A commercial licence billed by the hour (RHEL).
    pub licensed: bool,
}

impl PublicImage {
    pub fn is_windows(&self) -> bool {
        self.platform == "Windows"
    }

    /// What kind of source it is for billing, the same in every region (the price book
    /// decides where Windows is free).
    pub fn root_kind(&self) -> crate::model::RootKind {
        if self.licensed {
            crate::model::RootKind::Licensed
        } else if self.is_windows() {
            crate::model::RootKind::Windows
        } else {
            crate::model::RootKind::Free
        }
    }

    /// Whether launching it is billed in a region: commercial licences everywhere, Windows
    /// outside mainland China.
    pub fn paid_in(&self, mainland: bool) -> bool {
        self.licensed || (self.is_windows() && !mainland)
    }
}

pub const PUBLIC_IMAGES: &[PublicImage] = &[
    PublicImage {
        name: "TencentOS Server 3.1 (TK4)",
        os_name: "TencentOS Server 3.1 (TK4)",
        platform: "TencentOS",
        architecture: "x86_64",
        virtual_size_mib: 128,
        partition_type: 0x83,
        licensed: false,
    },
    PublicImage {
        name: "CentOS 7.9 64bit",
        os_name: "CentOS 7.9 64bit",
        platform: "CentOS",
        architecture: "x86_64",
        virtual_size_mib: 128,
        partition_type: 0x83,
        licensed: false,
    },
    PublicImage {
        name: "Ubuntu Server 22.04 LTS 64bit",
        os_name: "Ubuntu Server 22.04 LTS 64bit",
        platform: "Ubuntu",
        architecture: "x86_64",
        virtual_size_mib: 128,
        partition_type: 0x83,
        licensed: false,
    },
    PublicImage {
        name: "Debian 12.0 64bit",
        os_name: "Debian 12.0 64bit",
        platform: "Debian",
        architecture: "x86_64",
        virtual_size_mib: 64,
        partition_type: 0x83,
        licensed: false,
    },
    PublicImage {
        name: "Windows Server 2022 DataCenter 64bit",
        os_name: "Windows Server 2022 DataCenter 64bit",
        platform: "Windows",
        architecture: "x86_64",
        virtual_size_mib: 256,
        partition_type: 0x07,
        licensed: false,
    },
    PublicImage {
        name: "Red Hat Enterprise Linux 8.8 64bit",
        os_name: "Red Hat Enterprise Linux 8.8 64bit",
        platform: "RedHat",
        architecture: "x86_64",
        virtual_size_mib: 128,
        partition_type: 0x83,
        licensed: true,
    },
];

/// Regions in mainland China; copies stay on one side of this line.
pub fn is_mainland(region: &str) -> bool {
    matches!(
        region,
        "ap-guangzhou"
            | "ap-shanghai"
            | "ap-beijing"
            | "ap-nanjing"
            | "ap-chengdu"
            | "ap-chongqing"
    )
}

/// The platforms an imported image may declare, each with the versions it may declare
/// (`DescribeImportImageOs`). The platforms are those of the public images, plus `Other`.
pub const IMPORT_OS: &[(&str, &[&str])] = &[
    ("TencentOS", &["2.4", "3.1", "4"]),
    ("CentOS", &["7", "8", "9"]),
    ("Ubuntu", &["18.04", "20.04", "22.04", "24.04"]),
    ("Debian", &["10", "11", "12"]),
    ("RedHat", &["7", "8", "9"]),
    ("Windows", &["2012", "2016", "2019", "2022"]),
    ("Other", &["Linux", "Windows", "-"]),
];

/// Architectures an imported image may declare.
pub const IMPORT_ARCHITECTURES: &[&str] = &["x86_64", "arm64"];

/// Formats an import may declare.
pub const IMPORT_FORMATS: &[&str] = &["raw", "qcow2", "vmdk", "vhd", "vpc", "vhdx", "iso"];
