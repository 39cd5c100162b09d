"""The protocol layer: translator.v1 over gRPC, mapped onto the scheduler's domain.

`servicer` implements the RPCs and turns every exception into its status code, `requests`
validates a call and builds the scheduler's requests (each limit named in its message),
`responses` builds the replies; `tls` (the port's certificates, re-read when they change) and
`auth` (bearer tokens, a server interceptor) guard the port. Nothing below this layer imports
grpc or the generated code.
"""
