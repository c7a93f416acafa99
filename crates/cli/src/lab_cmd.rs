//! TODO: lab up/down/status/daemon/exec
