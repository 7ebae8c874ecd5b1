/**
 * Runs INSIDE the user-mode-linux guest (test/lvm/nbd-kernel.test.ts boots
 * it, after insmod nbd.ko): the agent's own kernel NBD attach, compiled
 * (dist/), against the appliance's NBD server on the host (10.0.2.2).
 * Plain JavaScript on purpose: node starts in the guest in a second, vitest
 * takes far longer under UML's ptrace. It checks nothing itself; it writes
 * what it saw to $BSN_OUT/result.json and the host test asserts.
 *
 * 1. read-only export: defaultAttacher() picks nbd-client (there is a
 *    /dev/nbd0), attach → the device's size, read-only flag and SHA-256 of
 *    all its bytes; a write is refused; the recorded step is released
 *    (nbd-client -d) and the device is free again (no pid, size 0); a
 *    second release answers 'absent'.
 * 2. writable export: a 64 KiB pattern written at an unaligned offset and
 *    fsync'ed through the device, released, attached again, read back.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

const dist = process.env.BSN_DIST;
const { defaultAttacher } = await import(`${dist}/agent/mount/nbd-attacher.js`);
const { MountJournal } = await import(`${dist}/agent/mount/mount-state.js`);
const { releaseStep, releaseSteps } = await import(`${dist}/agent/mount/mount-steps.js`);

const result = { steps: [] };
const save = () => writeFile(path.join(process.env.BSN_OUT, 'result.json'), JSON.stringify(result, null, 2));
const sys = (dev, f) => readFile(`/sys/block/${path.basename(dev)}/${f}`, 'utf8').then((s) => s.trim(), () => null);
const deviceState = async (dev) => ({ pid: await sys(dev, 'pid'), size: Number(await sys(dev, 'size')) * 512, ro: await sys(dev, 'ro') });

async function sha256Of(dev, size) {
  const fd = await open(dev, 'r');
  try {
    const h = createHash('sha256');
    const buf = Buffer.alloc(1 << 20);
    for (let off = 0; off < size;) {
      const { bytesRead } = await fd.read(buf, 0, Math.min(buf.length, size - off), off);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      off += bytesRead;
    }
    return h.digest('hex');
  } finally {
    await fd.close();
  }
}

async function attachRound(name, uri, readOnly, body) {
  const stateDir = await mkdtemp('/tmp/bsn-agent-state-');
  const workDir = await mkdtemp('/tmp/bsn-mount-work-');
  const journal = await MountJournal.create(stateDir, { mountId: `${name}-${randomBytes(4).toString('hex')}`, imageId: 'img', target: '/tmp/none' });
  const attacher = await defaultAttacher();
  const r = { kind: attacher.kind };
  result[name] = r;
  try {
    const started = performance.now();
    r.device = await attacher.attach(uri, { workDir, name: 'pgdata', readOnly }, journal);
    r.attachSeconds = (performance.now() - started) / 1000;
    r.recorded = structuredClone(journal.state.steps);
    r.attached = await deviceState(r.device);
    await body(r);
  } catch (e) {
    r.error = `${e.code ?? ''} ${e.message}`;
  } finally {
    const outcomes = [];
    try {
      await releaseSteps(journal.state.steps, (_s, o) => outcomes.push(o));
    } catch (e) {
      r.releaseError = `${e.code ?? ''} ${e.message}`;
    }
    r.release = outcomes;
    if (r.device) {
      r.released = await deviceState(r.device);
      r.releaseAgain = await Promise.all(journal.state.steps.map((s) => releaseStep(s).catch((e) => `error ${e.message}`)));
    }
    await journal.remove();
    await save();
  }
}

const size = Number(process.env.BSN_SIZE);
await attachRound('ro', process.env.BSN_RO_URI, true, async (r) => {
  r.sha256 = await sha256Of(r.device, size);
  const fd = await open(r.device, 'r+').catch((e) => e);
  if (fd instanceof Error) r.writeRefused = fd.code;
  else {
    try {
      await fd.write(Buffer.alloc(4096, 1), 0, 4096, 0);
      await fd.sync();
      r.writeRefused = null;
    } catch (e) {
      r.writeRefused = e.code;
    } finally {
      await fd.close();
    }
  }
});

const at = Number(process.env.BSN_WRITE_AT);
const pattern = Buffer.alloc(65536);
for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + 3) & 0xff;
await attachRound('rw', process.env.BSN_RW_URI, false, async () => {
  const fd = await open(result.rw.device, 'r+');
  try {
    await fd.write(pattern, 0, pattern.length, at);
    await fd.sync();
  } finally {
    await fd.close();
  }
});
await attachRound('rw2', process.env.BSN_RW_URI, true, async (r) => {
  const fd = await open(r.device, 'r');
  try {
    const back = Buffer.alloc(pattern.length);
    await fd.read(back, 0, back.length, at);
    r.readBackEqual = back.equals(pattern);
  } finally {
    await fd.close();
  }
  r.sha256 = await sha256Of(r.device, size);
});
result.done = true;
await save();
