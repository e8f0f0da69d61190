"""Code generated from molink/transport/molink.proto. Do not edit."""
