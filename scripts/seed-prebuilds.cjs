// Keeps the native addons this machine compiled, so the next `npm ci` (a
// fresh clone, CI) does not compile them again.
//
// better-sqlite3 and zstd-napi install with `prebuild-install || node-gyp
// rebuild`: where their GitHub release downloads are unreachable they are
// compiled from source, ~3 CPU-minutes (SQLite ~115 s, zstd ~60 s) of the
// install. prebuild-install looks in npm's cache (<cache>/_prebuilds/, named
// after the download URL) before the network; this puts the addon just built
// there, in the release tarball's layout, once it loads. Run by
// scripts/ensure-deps.sh after `npm ci`; never fails the install.
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const addons = [
  { name: 'better-sqlite3', args: [], binding: 'build/Release/better_sqlite3.node' },
  { name: 'zstd-napi', args: ['-r', 'napi'], binding: 'build/Release/binding.node' },
];

for (const a of addons) {
  try {
    const dir = path.join(root, 'node_modules', a.name);
    // The cache name prebuild-install looks for, from its own options (read from
    // argv and the cwd's package.json, so in a child process run in the package).
    const cached = execFileSync(process.execPath, ['-e', `
      const pkg = require('./package.json');
      const rc = require(require.resolve('prebuild-install/rc', { paths: ['.'] }))(pkg);
      const util = require(require.resolve('prebuild-install/util', { paths: ['.'] }));
      process.stdout.write(util.cachedPrebuild(util.getDownloadUrl({ ...rc, pkg })));`, '--', ...a.args], { cwd: dir, encoding: 'utf8' });
    if (fs.existsSync(cached)) continue;
    require(dir); // only an addon that loads is kept
    fs.mkdirSync(path.dirname(cached), { recursive: true });
    const tmp = `${cached}.${process.pid}.tmp`;
    execFileSync('tar', ['-czf', tmp, '-C', dir, a.binding]);
    fs.renameSync(tmp, cached);
    console.error(`blocksnap: kept the ${a.name} addon built here in ${cached}`);
  } catch (e) {
    console.error(`blocksnap: not keeping the ${a.name} addon (${e.message})`);
  }
}
