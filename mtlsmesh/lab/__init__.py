"""The pod lab: a node and its pods built from network namespaces, for the demo and the end-to-end tests.

Nothing here runs in a pod. The sidecar and the init step never import this package, and the container image does
not carry it (`deploy/Dockerfile.dockerignore`): `mtlsmesh demo` needs a source checkout and root.

`pods` builds and tears down the lab (`Lab`), `topology` plans its addresses and renders its configs, `netns` wraps
`ip netns`, `demoapps` are the apps the pods run, `pcap` reads the capture of the wire, `demo` is `mtlsmesh demo`.
"""
