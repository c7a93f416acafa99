//! TODO: apply/delete/get
