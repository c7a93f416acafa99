//! parse_documents on real Kubernetes YAML, good and bad.

use ferrum_model::{Kind, Object, ObjectRef, ParseError, parse_documents};

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    team: web
---
# an empty document follows
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels:
    app: web
    app.kubernetes.io/part-of: shop
spec:
  nodeName: node-1
  containers:
  - name: nginx
    image: nginx:1.27
    ports:
    - containerPort: 80
      name: http
    - containerPort: 53
      protocol: UDP
    readinessProbe:
      tcpSocket:
        port: http
      periodSeconds: 2
  - name: sidecar
    image: busybox
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: NodePort
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
    nodePort: 30080
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 53
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-frontend
  namespace: shop
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: front
      podSelector:
        matchExpressions:
        - {key: tier, operator: In, values: [frontend]}
    - ipBlock:
        cidr: 10.0.0.0/8
        except: [10.1.0.0/16]
    ports:
    - protocol: TCP
      port: 8000
      endPort: 8080
  egress:
  - to:
    - podSelector: {}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true}
ports:
- name: http
  port: 80
  protocol: TCP
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
spec:
  podCIDR: 10.244.1.0/24
"#;

#[test]
fn parses_every_supported_kind_and_skips_empty_documents() {
    let objects = parse_documents(GOOD).expect("valid YAML must parse");
    let refs: Vec<String> = objects
        .iter()
        .map(|o| ObjectRef::of(o).to_string())
        .collect();
    assert_eq!(
        refs,
        [
            "Namespace shop",
            "Pod shop/web-0",
            "Service shop/web",
            "NetworkPolicy shop/allow-frontend",
            "EndpointSlice shop/web-abc",
            "Node node-1",
        ]
    );
    let Object::Pod(pod) = &objects[1] else {
        panic!("second object is not a Pod");
    };
    let spec = pod.spec.as_ref().expect("pod spec");
    assert_eq!(spec.node_name.as_deref(), Some("node-1"));
    assert_eq!(spec.containers[0].ports.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        spec.containers[1].command.as_deref(),
        Some(&["sleep".to_string(), "3600".to_string()][..])
    );
}

#[test]
fn namespace_defaults_for_namespaced_kinds_only() {
    let objects = parse_documents(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c}]}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: n, namespace: ignored}\n",
    )
    .unwrap();
    assert_eq!(objects[0].namespace(), Some("default"));
    assert_eq!(objects[1].namespace(), None);
}

#[test]
fn list_items_are_expanded() {
    let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: a}
- apiVersion: v1
  kind: Namespace
  metadata: {name: b}
"#;
    let objects = parse_documents(yaml).unwrap();
    assert_eq!(objects.len(), 2);
    assert_eq!(Kind::of(&objects[1]), Kind::Namespace);
    assert_eq!(objects[1].name(), "b");
}

#[test]
fn empty_input_is_no_objects() {
    assert_eq!(parse_documents("").unwrap(), vec![]);
    assert_eq!(
        parse_documents("---\n---\n# only a comment\n").unwrap(),
        vec![]
    );
}

fn err(yaml: &str) -> String {
    match parse_documents(yaml) {
        Ok(objects) => panic!("accepted bad YAML, got {objects:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn type_mismatch_names_document_object_and_field_path() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
spec:
  containers:
  - name: c
    ports:
    - containerPort: eighty
"#;
    let e = err(yaml);
    assert!(
        e.starts_with(
            "document 2 (Pod x/a): spec.containers[0].ports[0].containerPort: invalid type"
        ),
        "{e}"
    );
}

#[test]
fn unknown_kind_and_wrong_api_version_are_refused() {
    let e = err("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
    assert!(
        e.contains("document 1") && e.contains("unsupported kind \"Deployment\""),
        "{e}"
    );
    let e = err("apiVersion: v1\nkind: NetworkPolicy\nmetadata: {name: d}\nspec: {}\n");
    assert!(
        e.contains("unsupported kind \"NetworkPolicy\" in apiVersion \"v1\""),
        "{e}"
    );
    let e = err("kind: Pod\nmetadata: {name: d}\n");
    assert!(e.contains("apiVersion: required"), "{e}");
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    let e = err(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: c\n    prots: [{containerPort: 80}]\n",
    );
    assert_eq!(
        e,
        "document 1 (Pod default/a): spec.containers[0].prots: unknown field"
    );
}

#[test]
fn invalid_yaml_is_reported_with_document_number() {
    let e = err("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nfoo: [unclosed\n");
    assert!(e.starts_with("document 2: not valid YAML"), "{e}");
}

#[test]
fn pod_rules() {
    let pod =
        |spec: &str| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {spec}\n");
    let cases = [
        ("{containers: []}", "spec.containers: required"),
        (
            "{containers: [{name: a}, {name: a}]}",
            "spec.containers[1].name: duplicate container name",
        ),
        (
            "{containers: [{name: a, ports: [{containerPort: 70000}]}]}",
            "spec.containers[0].ports[0].containerPort: must be between 1 and 65535, got 70000",
        ),
        (
            "{containers: [{name: a, ports: [{containerPort: 0}]}]}",
            "containerPort: must be between 1 and 65535, got 0",
        ),
        (
            "{containers: [{name: a, ports: [{containerPort: 80, protocol: ICMP}]}]}",
            "spec.containers[0].ports[0].protocol: unsupported protocol \"ICMP\"",
        ),
        (
            "{containers: [{name: Bad_Name}]}",
            "spec.containers[0].name: invalid container name",
        ),
        (
            "{containers: [{name: a, readinessProbe: {periodSeconds: 1}}]}",
            "spec.containers[0].readinessProbe: needs one handler",
        ),
    ];
    for (spec, want) in cases {
        let e = err(&pod(spec));
        assert!(e.contains(want), "spec {spec}: got {e:?}, want {want:?}");
        assert!(e.starts_with("document 1 (Pod default/p): "), "{e}");
    }
    let e = err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n");
    assert!(e.ends_with("spec: required"), "{e}");
}

#[test]
fn names_and_labels_are_checked() {
    let e = err("apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n");
    assert!(
        e.contains("Namespace <unnamed>") && e.contains("metadata.name: required"),
        "{e}"
    );
    let e = err(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Web_0}\nspec: {containers: [{name: c}]}\n",
    );
    assert!(e.contains("metadata.name: invalid name \"Web_0\""), "{e}");
    let e = err(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: \"not ok\"}}\nspec: {containers: [{name: c}]}\n",
    );
    assert!(
        e.contains("metadata.labels[app]: invalid label value"),
        "{e}"
    );
    // Numbers as label values are a type error in Kubernetes too (labels are strings).
    let e = err(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {v: 1}}\nspec: {containers: [{name: c}]}\n",
    );
    assert!(e.contains("metadata.labels.v: invalid type"), "{e}");
    let e =
        err("apiVersion: v1\nkind: Service\nmetadata: {name: 1svc}\nspec: {ports: [{port: 80}]}\n");
    assert!(e.contains("DNS-1035"), "{e}");
}

#[test]
fn service_rules() {
    let svc = |spec: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {spec}\n")
    };
    let cases = [
        ("{selector: {app: a}}", "spec.ports: required"),
        (
            "{ports: [{port: 80}, {port: 81}]}",
            "spec.ports[0].name: required when",
        ),
        (
            "{ports: [{name: a, port: 80}, {name: b, port: 80}]}",
            "spec.ports[1].port: duplicate port 80/TCP",
        ),
        (
            "{ports: [{port: 80, nodePort: 30000}]}",
            "spec.ports[0].nodePort: may only be set",
        ),
        (
            "{type: Magic, ports: [{port: 80}]}",
            "spec.type: unsupported value",
        ),
        (
            "{clusterIP: 10.0.0.300, ports: [{port: 80}]}",
            "spec.clusterIP: invalid value",
        ),
        (
            "{ports: [{port: 80, targetPort: not_a_name}]}",
            "spec.ports[0].targetPort: invalid port name",
        ),
    ];
    for (spec, want) in cases {
        let e = err(&svc(spec));
        assert!(e.contains(want), "spec {spec}: got {e:?}, want {want:?}");
    }
    // Same port with two protocols is fine; headless services need no ports.
    parse_documents(&svc(
        "{ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}]}",
    ))
    .unwrap();
    parse_documents(&svc("{clusterIP: None, selector: {app: a}}")).unwrap();
}

#[test]
fn network_policy_rules() {
    let np = |spec: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: n}}\nspec: {spec}\n"
        )
    };
    let cases = [
        (
            "{policyTypes: [Sideways]}",
            "spec.policyTypes[0]: unsupported value",
        ),
        (
            "{ingress: [{from: [{}]}]}",
            "spec.ingress[0].from[0]: needs podSelector",
        ),
        (
            "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
            "may not be combined",
        ),
        (
            "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
            "ipBlock.cidr: invalid CIDR",
        ),
        (
            "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}",
            "ipBlock.except[0]: 11.0.0.0/16 must be strictly within",
        ),
        (
            "{ingress: [{ports: [{port: 90, endPort: 80}]}]}",
            "spec.ingress[0].ports[0].endPort: must be between port (90)",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
            "spec.podSelector.matchExpressions[0].values: operator In needs",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: Maybe}]}}",
            "unknown operator",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: DoesNotExist, values: [x]}]}}",
            "spec.podSelector.matchExpressions[0].values: operator DoesNotExist takes no values",
        ),
        (
            "{podSelector: {matchExpressions: [{key: 'a b', operator: Exists}]}}",
            "spec.podSelector.matchExpressions[0].key: invalid label key",
        ),
        (
            "{ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: NotIn, values: ['-x']}]}}]}]}",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values[0]: invalid label value",
        ),
        (
            "{ingress: [{from: [{namespaceSelector: {matchLabels: {team: 'a b'}}}]}]}",
            "spec.ingress[0].from[0].namespaceSelector.matchLabels[team]: invalid label value",
        ),
        (
            "{ingress: [{from: [{ipBlock: {cidr: ''}}]}]}",
            "spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR",
        ),
        (
            "{ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]}",
            "spec.ingress[0].from[0].ipBlock.except[0]: 10.0.0.0/8 must be strictly within",
        ),
        (
            "{ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]}]}",
            "spec.ingress[0].from[0].ipBlock.except[0]: fd00::/64 must be strictly within",
        ),
        (
            "{ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0]}}]}]}",
            "spec.ingress[0].from[0].ipBlock.except[0]: invalid CIDR",
        ),
        (
            "{ingress: [{ports: [{port: 0}]}]}",
            "spec.ingress[0].ports[0].port: must be between 1 and 65535",
        ),
        (
            "{egress: [{ports: [{port: 65536}]}]}",
            "spec.egress[0].ports[0].port: must be between 1 and 65535",
        ),
        (
            "{ingress: [{ports: [{port: '80'}]}]}",
            "spec.ingress[0].ports[0].port: \"80\" is a quoted number",
        ),
        (
            "{ingress: [{ports: [{port: Serve_80}]}]}",
            "spec.ingress[0].ports[0].port: invalid port name",
        ),
        (
            "{ingress: [{ports: [{port: http, endPort: 90}]}]}",
            "spec.ingress[0].ports[0].endPort: may only be set together with a numeric port",
        ),
        (
            "{ingress: [{ports: [{endPort: 90}]}]}",
            "spec.ingress[0].ports[0].endPort: may only be set together with a numeric port",
        ),
        (
            "{ingress: [{ports: [{port: 80, endPort: 65536}]}]}",
            "spec.ingress[0].ports[0].endPort: must be between port (80) and 65535",
        ),
        (
            "{egress: [{ports: [{port: 53, protocol: ICMP}]}]}",
            "spec.egress[0].ports[0].protocol: unsupported protocol \"ICMP\"",
        ),
        (
            "{egress: [{ports: [{port: 53, protocol: udp}]}]}",
            "spec.egress[0].ports[0].protocol: unsupported protocol \"udp\"",
        ),
        (
            "{policyTypes: [Ingress, Ingress]}",
            "spec.policyTypes[1]: duplicate policy type",
        ),
    ];
    for (spec, want) in cases {
        let e = err(&np(spec));
        assert!(e.contains(want), "spec {spec}: got {e:?}, want {want:?}");
    }
    let e = err("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\n");
    assert!(e.ends_with("spec: required"), "{e}");
    // What upstream accepts stays accepted: SCTP, named ports, ranges, IPv6 blocks, host bits.
    parse_documents(&np(
        "{ingress: [{from: [{ipBlock: {cidr: 10.0.0.1/8, except: [10.1.0.0/16]}}, \
         {ipBlock: {cidr: 'fd00::/48', except: ['fd00::/64']}}], \
         ports: [{port: 80, endPort: 80}, {port: serve-80-tcp}, {protocol: SCTP, port: 5000}]}]}",
    ))
    .unwrap();
}

#[test]
fn errors_are_structured() {
    match parse_documents(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n",
    ) {
        Err(ParseError::Invalid { location, error }) => {
            assert_eq!(location, "document 1");
            assert_eq!(error.object, "Pod default/a");
            assert_eq!(error.field, "spec.containers");
        }
        other => panic!("unexpected {other:?}"),
    }
}
