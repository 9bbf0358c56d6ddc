/*
 * The one place the release version is written. `core.version` and
 * `duplex.version` come from here; spec/rockspec_spec.lua checks that the
 * versioned rockspecs and CHANGELOG.md's newest release say the same.
 */
#ifndef DX_VERSION_H
#define DX_VERSION_H

#define DX_VERSION "0.2.0"

#endif
