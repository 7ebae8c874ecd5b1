import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach } from 'vitest';

/** A fresh temporary directory for each test of the calling describe block, removed after it (also when the test fails). */
export function tempDirEach(prefix: string): { readonly path: string } {
  const box = { path: '' };
  beforeEach(async () => {
    box.path = await mkdtemp(path.join(tmpdir(), prefix));
  });
  afterEach(async () => {
    await rm(box.path, { recursive: true, force: true });
  });
  return box;
}
