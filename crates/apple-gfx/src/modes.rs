//! Display modes offered to the guest. The syntax and its checks belong
//! to the configuration model ([`vm_config::display`]); they are here
//! under the device's name too.

pub use vm_config::display::*;
