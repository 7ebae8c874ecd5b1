import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { distDir, loadedOf, moduleLoads } from '../support/module-loads.js';
import { tempDirEach } from '../support/temp-dir.js';

/*
 * Start-up cost (issue 8): an offline command opens the stores through
 * appliance/compose.ts but never listens, so the WebSocket listener (ws) and
 * the NBD server load only when `serve` starts them. Fails on the build before
 * (compose.ts imported both: 9 ws modules, nbd-server and its session).
 */
describe('appliance start-up: offline commands do not load what only serve uses', () => {
  const tmp = tempDirEach('bsn-appl-lazy-');

  it('offline `verify` opens the store without loading ws or the NBD server', async () => {
    const data = path.join(tmp.path, 'data');
    await mkdir(data);
    const cli = path.join(distDir, 'appliance/cli.js');
    const add = await moduleLoads(tmp.path, [cli, 'agents', 'add', 'db1', '--data', data]);
    expect(add.code, add.stderr).toBe(0);
    const r = await moduleLoads(tmp.path, [cli, 'verify', '--data', data]);
    expect(r.stderr).toMatch(/E_NOT_FOUND: no image/); // the store was opened, then it found nothing to verify
    expect(r.urls.some((u) => u.endsWith('/appliance/store/fs-chunk-store.js'))).toBe(true);
    expect(loadedOf(r.urls, [/\/node_modules\/ws\//, /\/proto\/ws-transport\.js$/, /\/appliance\/nbd\/nbd-(server|session)\.js$/])).toEqual([]);
  });
});
