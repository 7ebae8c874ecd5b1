import { isBlocksnapError } from '../../proto/errors.js';

/**
 * The BlocksnapError code a promise rejects with. A resolution, or a
 * rejection that is not a BlocksnapError, fails the test (thrown), so a
 * test comparing codes cannot pass by accident.
 */
export async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    if (isBlocksnapError(e)) return e.code;
    throw e;
  }
  throw new Error('expected a rejection');
}
