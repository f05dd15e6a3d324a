//! Bad requests get proper `Status` errors, and the server keeps serving.

use devcluster::{DevCluster, ServerOptions};
use http::Request;
use serde_json::Value;

async fn client(cluster: &DevCluster) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&cluster.kubeconfig("t")).unwrap();
    kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
}

async fn send(
    client: &kube::Client,
    method: &str,
    uri: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(body.into())
        .unwrap();
    let res = client.send(req).await.unwrap();
    let code = res.status().as_u16();
    let bytes = res.into_body().collect_bytes().await.unwrap();
    let status: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {bytes:?}"));
    (code, status)
}

#[tokio::test]
async fn bad_requests_get_status_errors_and_the_server_keeps_serving() {
    let cluster = DevCluster::start(ServerOptions::default()).await.unwrap();
    let client = client(&cluster).await;
    let pods = "/api/v1/namespaces/default/pods";
    let json = "application/json";
    // (method, uri, content type, body, expected code, expected reason)
    type Case<'a> = (&'a str, String, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", pods.into(), json, b"{not json".to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), json, br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#.to_vec(), 400, "BadRequest"),
        ("GET", "/api/v1/widgets".into(), json, vec![], 404, "NotFound"),
        ("GET", "/apis/nope.io/v1/things".into(), json, vec![], 404, "NotFound"),
        ("GET", format!("{pods}?labelSelector=a%20in%20(b"), json, vec![], 400, "BadRequest"),
        ("GET", format!("{pods}?fieldSelector=spec.bogus%3Dx"), json, vec![], 400, "BadRequest"),
        ("POST", pods.into(), json, vec![b' '; 4 * 1024 * 1024], 413, "RequestEntityTooLarge"),
        // A truncated protobuf envelope, and a protobuf kind devcluster does not decode.
        ("POST", "/api/v1/namespaces".into(), "application/vnd.kubernetes.protobuf", b"k8s\x00\x0a".to_vec(), 400, "BadRequest"),
        ("POST", pods.into(), "application/vnd.kubernetes.protobuf", b"k8s\x00\x0a\x0b\x0a\x02v1\x12\x03Pod\x12\x00".to_vec(), 415, "UnsupportedMediaType"),
        ("POST", pods.into(), "application/x-something", b"?".to_vec(), 415, "UnsupportedMediaType"),
        ("POST", pods.into(), json, br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"Bad_Name"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(), 422, "Invalid"),
        ("POST", "/api/v1/namespaces/missing/pods".into(), json, br#"{"metadata":{"name":"p"}}"#.to_vec(), 404, "NotFound"),
        ("PUT", "/version".into(), json, vec![], 405, "MethodNotAllowed"),
    ];
    for (method, uri, content_type, body, code, reason) in cases {
        let (got, status) = send(&client, method, &uri, content_type, body).await;
        assert_eq!(got, code, "{method} {uri}: {status}");
        assert_eq!(status["kind"], "Status", "{method} {uri}: {status}");
        assert_eq!(status["reason"], reason, "{method} {uri}: {status}");
        assert_eq!(status["code"], code, "{method} {uri}: {status}");
        assert!(
            status["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{status}"
        );
    }
    let (code, invalid) = send(
        &client,
        "POST",
        pods,
        json,
        br#"{"metadata":{"name":"Bad_Name"},"spec":{"containers":[{"name":"c","image":"i"}]}}"#.to_vec(),
    )
    .await;
    assert_eq!(code, 422);
    assert_eq!(invalid["details"]["causes"][0]["field"], "metadata.name");

    // Still serving.
    let (code, list) = send(&client, "GET", pods, json, vec![]).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PodList");
    cluster.shutdown().await;
}
