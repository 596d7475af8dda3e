package fs

// serveEnv, when set in the environment of the test binary, makes it a
// mount server instead of running tests (see startServer).
const serveEnv = "SNAPFS_FS_TEST_SERVE"

func serve() int { return 2 }
