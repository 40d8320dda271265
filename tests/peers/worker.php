<?php
// A real PHP worker (pecl gearman on libgearman) written as legacy code is: the database
// driver's exception is caught at the top of the handler and reported with sendException
// as it is, with no retry marker. Whether it is retried is gproxy's retry_on / fatal_on.
//
// Usage: php worker.php HOST:PORT STATE_DIR
//
// Function php_db: payload `SCRIPT|rest`, SCRIPT a comma-separated list of actions; attempt
// k (counted per payload: STATE_DIR/php-<sha1(payload)>, one byte appended per attempt)
// takes action k, the last one repeating:
//   ok         returns "ok after <attempt>"
//   locked     a real PDOException from PDO's SQLite driver: another connection holds the
//              database's write lock ("SQLSTATE[HY000]: General error: 5 database is locked")
//   refused    a real PDOException from PDO's MySQL driver: nothing listens on the port
//              ("SQLSTATE[HY000] [2002] Connection refused")
//   mysqli     a real mysqli_sql_exception, the same refusal through mysqli
//   deadlock   the PDOException PDO's MySQL driver throws on a deadlock, its text verbatim
//              (there is no MySQL server here to deadlock): "SQLSTATE[40001]: Serialization
//              failure: 1213 Deadlock found when trying to get lock; try restarting transaction"
//   duplicate  likewise for a duplicate key: "SQLSTATE[23000]: Integrity constraint
//              violation: 1062 Duplicate entry '7' for key 'PRIMARY'"
// Every attempt appends `<attempt> <action>` to STATE_DIR/php.log. Prints "ready" once its
// function is registered.

[$address, $state] = [$argv[1], $argv[2]];
[$host, $port] = explode(":", $address);

function attempt(string $state, string $payload): int {
    $counter = "$state/php-" . sha1($payload);
    file_put_contents($counter, "x", FILE_APPEND | LOCK_EX);
    clearstatcache();
    return filesize($counter);
}

function closed_port(): int {
    $socket = stream_socket_server("tcp://127.0.0.1:0");
    $port = (int) explode(":", stream_socket_get_name($socket, false))[1];
    fclose($socket);
    return $port;
}

function act(string $action, string $state): void {
    switch ($action) {
        case "ok":
            return;
        case "locked":
            $path = "$state/locked.sqlite";
            $holder = new PDO("sqlite:$path");
            $holder->exec("CREATE TABLE IF NOT EXISTS t (x)");
            $holder->exec("BEGIN EXCLUSIVE");
            $writer = new PDO("sqlite:$path", null, null, [PDO::ATTR_TIMEOUT => 0]);
            $writer->setAttribute(PDO::ATTR_ERRMODE, PDO::ERRMODE_EXCEPTION);
            $writer->exec("INSERT INTO t VALUES (1)");
            throw new LogicException("the write lock was not held");
        case "refused":
            new PDO("mysql:host=127.0.0.1;port=" . closed_port() . ";dbname=app", "app", "secret");
            throw new LogicException("a closed port accepted");
        case "mysqli":
            mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
            new mysqli("127.0.0.1", "app", "secret", "app", closed_port());
            throw new LogicException("a closed port accepted");
        case "deadlock":
            throw new PDOException("SQLSTATE[40001]: Serialization failure: 1213 Deadlock found when trying to get lock; try restarting transaction");
        case "duplicate":
            throw new PDOException("SQLSTATE[23000]: Integrity constraint violation: 1062 Duplicate entry '7' for key 'PRIMARY'");
    }
    throw new LogicException("unknown action $action");
}

$worker = new GearmanWorker();
$worker->addServer($host, (int) $port);
$worker->addFunction("php_db", function (GearmanJob $job) use ($state) {
    $payload = $job->workload();
    $script = explode(",", explode("|", $payload, 2)[0]);
    $attempt = attempt($state, $payload);
    $action = $script[min($attempt, count($script)) - 1];
    file_put_contents("$state/php.log", "$attempt $action\n", FILE_APPEND | LOCK_EX);
    try {
        act($action, $state);
        return "ok after $attempt";
    } catch (PDOException | mysqli_sql_exception $e) {
        $job->sendException(get_class($e) . ": " . $e->getMessage());
        $job->setReturn(GEARMAN_WORK_FAIL);
        return "";
    }
});
echo "ready\n";
// work() returns false after a job the handler failed (GEARMAN_UNKNOWN_STATE for pecl
// gearman 2.1): a worker goes on unless its job server is gone.
while (true) {
    if ($worker->work()) {
        continue;
    }
    fwrite(STDERR, "worker.php: " . $worker->returnCode() . " " . $worker->error() . "\n");
    if (in_array($worker->returnCode(), [GEARMAN_LOST_CONNECTION, GEARMAN_COULD_NOT_CONNECT, GEARMAN_NO_ACTIVE_FDS], true)) {
        exit(1);
    }
}
