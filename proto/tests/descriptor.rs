//! The exported descriptor set is what reflection clients see: it must describe both services.

use prost::Message;

#[test]
fn descriptor_set_describes_both_services() {
    let set = prost_types::FileDescriptorSet::decode(rcsync_proto::FILE_DESCRIPTOR_SET).unwrap();
    let services: Vec<String> = set
        .file
        .iter()
        .filter(|f| f.package() == "rcsync.v1")
        .flat_map(|f| f.service.iter().map(|s| format!("rcsync.v1.{}", s.name())))
        .collect();
    assert!(
        services.contains(&rcsync_proto::RUNTIME_CLASS_SYNC_SERVICE.to_string()),
        "{services:?}"
    );
    assert!(
        services.contains(&rcsync_proto::POD_SYNC_SERVICE.to_string()),
        "{services:?}"
    );
    // Documentation travels with our descriptors (source info), so reflection clients show it;
    // imported well-known types (google/protobuf/timestamp.proto) come along to resolve imports.
    assert!(
        set.file
            .iter()
            .filter(|f| f.package() == "rcsync.v1")
            .all(|f| f.source_code_info.is_some())
    );
    assert!(
        set.file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto"),
        "imports are in the set for reflection clients"
    );
}
