/**
 * The agent's side of the mount messages (agent/agent-mounts.ts) with a
 * recorded `send`: the grant becomes nbd[s]:// URIs on the appliance URL's
 * host, WAL pieces are accepted only in order and with the right SHA-256,
 * the appliance's refusals reach the caller with their code, and a mount
 * that fails after its grant is released on the appliance.
 */
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { AgentMounts } from '../../agent/agent-mounts.js';
import type { LocalMounter } from '../../agent/mount/mount-port.js';
import { BlocksnapError } from '../../proto/errors.js';
import { envelope, type Envelope, type MountGranted } from '../../proto/messages.js';
import { createLogger } from '../../proto/shared/log.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import { codeOf } from '../support/error-code.js';

const log = createLogger('test-agent-mounts', 'silent');
const NAME = '000000010000000000000007';
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

function rig(url = 'ws://127.0.0.1:7700', mounter: LocalMounter | null = null) {
  const sent: Envelope[] = [];
  const m = new AgentMounts({ mounter, applianceUrl: url, send: async (e) => void sent.push(e), waitConnected: async () => undefined, log, walTimeoutMs: 5_000, releaseAckMs: 50 });
  return { m, sent };
}

const grant = (over: Partial<MountGranted> = {}): MountGranted => ({
  requestId: 'mrq-1', mountId: 'mnt-1', nbdPort: 7701, tls: false, imageId: 'img-1', writable: true, expiresAt: '',
  exports: [{ volume: 'pgdata', imageId: 'img-1', exportName: 'ab'.repeat(16), size: 1 << 20, chunkSize: 65536 }],
  ...over,
});

const piece = (mountId: string, data: Buffer, offset: number, fileSize: number, digest = sha(data)) =>
  envelope('walPiece', { jobId: mountId, fileName: NAME, offset, data: zstdCompress(data), plainLength: data.length, digest, fileSize });

describe('AgentMounts', () => {
  it('turns a grant into nbd:// URIs on the appliance URL\'s host (nbds:// with TLS, IPv6 bracketed)', () => {
    expect(rig('ws://127.0.0.1:7700').m.grantOf(grant()).exports[0]!.uri).toBe(`nbd://127.0.0.1:7701/${'ab'.repeat(16)}`);
    expect(rig('wss://backup.example:443').m.grantOf(grant({ tls: true })).exports[0]!.uri).toBe(`nbds://backup.example:7701/${'ab'.repeat(16)}`);
    expect(rig('wss://[fd00::5]:7700').m.grantOf(grant({ tls: true })).exports[0]!.uri).toBe(`nbds://[fd00::5]:7701/${'ab'.repeat(16)}`);
  });

  it('assembles a WAL segment from pieces in order, each SHA-256 checked; refuses a bad digest, a gap, and the appliance\'s Error', async () => {
    const { m, sent } = rig();
    const wal = Buffer.alloc(6 << 20, 7);
    wal.write('segment head', 0);
    const fetch = m.walSource('mnt-1')('img-1', NAME);
    await Promise.resolve();
    expect(sent.at(-1)).toEqual(envelope('walFetch', { mountId: 'mnt-1', name: NAME }));
    // A piece of a mount nobody fetches for is dropped.
    expect(m.deliver(piece('mnt-other', wal.subarray(0, 4 << 20), 0, wal.length))).toBe(true);
    m.deliver(piece('mnt-1', wal.subarray(0, 4 << 20), 0, wal.length));
    m.deliver(piece('mnt-1', wal.subarray(4 << 20), 4 << 20, wal.length));
    expect((await fetch).equals(wal)).toBe(true);

    const bad = m.walSource('mnt-1')('img-1', NAME);
    m.deliver(piece('mnt-1', wal.subarray(0, 4 << 20), 0, wal.length, Buffer.alloc(32, 1)));
    expect(await codeOf(bad)).toBe('E_DIGEST_MISMATCH');

    const gap = m.walSource('mnt-1')('img-1', NAME);
    m.deliver(piece('mnt-1', wal.subarray(4 << 20), 4 << 20, wal.length));
    expect(await codeOf(gap)).toBe('E_PROTOCOL');

    const refused = m.walSource('mnt-1')('img-1', NAME);
    expect(m.deliver(envelope('error', { jobId: 'mnt-1', code: 'E_NOT_FOUND', message: 'no live mount' }))).toBe(true);
    expect(await codeOf(refused)).toBe('E_NOT_FOUND');
    // An Error for nothing pending is not the mounts' (the agent logs it).
    expect(m.deliver(envelope('error', { jobId: 'mnt-1', code: 'E_NOT_FOUND', message: 'again' }))).toBe(false);

    const lost = m.walSource('mnt-1')('img-1', NAME);
    m.disconnected();
    expect(await codeOf(lost)).toBe('E_DISCONNECTED');
    expect(await codeOf(m.walSource('mnt-1')('img-1', '../../etc/passwd'))).toBe('E_USAGE');
  });

  it('a refused request fails the mount with the appliance\'s code; a mount failing after its grant is released on the appliance', async () => {
    const failing: LocalMounter = {
      mount: async () => {
        throw new BlocksnapError('E_DEVICE', 'attach failed');
      },
      unmount: async () => undefined, list: async () => [], cleanupOrphans: async () => [],
    };
    const { m, sent } = rig('ws://127.0.0.1:7700', failing);
    const refused = m.mount({ imageId: 'img-9' }, 'mrq-a');
    await new Promise((r) => setImmediate(r));
    expect(sent.at(-1)).toEqual(envelope('mountRequest', { requestId: 'mrq-a', imageId: 'img-9', writable: true, ttlSeconds: 0 }));
    m.deliver(envelope('error', { jobId: 'mrq-a', code: 'E_NOT_FOUND', message: 'no image' }));
    expect(await codeOf(refused)).toBe('E_NOT_FOUND');

    const p = m.mount({ imageId: 'img-1' }, 'mrq-1');
    await new Promise((r) => setImmediate(r));
    m.deliver(envelope('mountGranted', grant()));
    expect(await codeOf(p)).toBe('E_DEVICE');
    expect(sent.at(-1)).toMatchObject({ kind: 'mountRelease', mountRelease: { mountId: 'mnt-1' } });

    // A grant for another image than asked is released and refused.
    const wrong = m.mount({ imageId: 'img-2' }, 'mrq-1');
    await new Promise((r) => setImmediate(r));
    m.deliver(envelope('mountGranted', grant()));
    expect(await codeOf(wrong)).toBe('E_PROTOCOL');
    expect(sent.at(-1)).toMatchObject({ kind: 'mountRelease', mountRelease: { mountId: 'mnt-1' } });
  });

  it('without a LocalMounter, mount is a configuration error', async () => {
    expect(await codeOf(rig().m.mount({ imageId: 'img-1' }))).toBe('E_CONFIG');
  });
});
