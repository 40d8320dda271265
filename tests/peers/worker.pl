#!/usr/bin/perl
# A real Perl Gearman::Worker (2.004) for integration tests.
#
# Usage: worker.pl HOST:PORT [--client-id ID] [--no-echo] [--state-dir DIR]
#                  [--timeout FUNCTION=VALUE]... [--chaos]
#                  [--tls [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]]
#
# --tls connects over TLS, as the library does it (job server { use_ssl => 1, ca_file,
# cert_file, key_file }: IO::Socket::SSL, which checks the server's certificate against
# ca_file and its name against HOST).
#
# Why this library: it sends plain GRAB_JOB, so gearmand answers JOB_ASSIGN (no unique);
# it sends SET_CLIENT_ID before every CAN_DO; after a GRAB_JOB it waits only 0.5 s for the
# reply before dropping the connection; a handler that dies makes it send WORK_EXCEPTION
# and then WORK_FAIL for the same handle.
#
# Functions:
#   reverse  payload reversed (binary safe)
#   echo     payload unchanged
#   block    payload is a path P: writes the job HANDLE to P.started (Gearman::Job has no
#            unique: JOB_ASSIGN does not carry one), waits (10 ms polls, up to 60 s) until
#            P exists, returns "unblocked" (returns undef -> WORK_FAIL on timeout)
#   flaky    payload `N:rest` (N decimal): attempt <= N dies with
#            "RETRY: transient failure <attempt>\n", else returns "ok after <attempt>".
#            The attempt counter is DIR/flaky-<sha1_hex(payload)>, one byte appended per
#            attempt (O_APPEND; the offset after the write is the attempt number). It is
#            keyed by the payload: this worker never sees the unique, and a retried job gets
#            a new handle. The die makes Gearman::Worker send WORK_EXCEPTION with the
#            Storable::nfreeze(\$err) of the message (binary, not the text itself) and then
#            WORK_FAIL; gearmand answers that WORK_FAIL with ERROR JOB_NOT_FOUND, which the
#            library reads as the reply to its next GRAB_JOB and dies ("unexpected packet
#            type: error"): this process then exits non-zero.
#            --state-dir defaults to a temp dir removed at exit.
#   flaky_db payload `N:rest`: like flaky, but attempt <= N dies as a DBI handle with
#            RaiseError does on a MySQL deadlock, with no marker: "DBD::mysql::st execute
#            failed: Deadlock found when trying to get lock; try restarting transaction at
#            FILE line N.\n" (Perl adds the place). Counter DIR/flaky-<sha1_hex(payload)>.
#   unregister  unregisters the function named by the payload, mid-job (Gearman::Worker
#            sends CANT_DO on its open connection)
#   die_plain  always dies with the unmarked message "boom: unmarked\n": Gearman::Worker
#            sends WORK_EXCEPTION <nfreeze(\"boom: unmarked\n")> and WORK_FAIL. Directly
#            against gearmand 1.1.20 the WORK_FAIL gets ERROR JOB_NOT_FOUND and this process
#            dies on it (exit 255), as with flaky; on Gearman::Server it survives.
#
# --chaos also registers the chaos functions `chaos` and `chaos_fail` of tests/chaos, the
# same as pyworker.py's (see its module doc) with the actions this library can do: ok,
# sleep=S, retry, after=S, fatal, plain (all but ok/sleep/fail die with the text, which
# Gearman::Worker sends frozen in a WORK_EXCEPTION, then WORK_FAIL), fail (the handler
# returns undef: a plain WORK_FAIL), each optionally prefixed `stream+` (send_work_data
# `data <n> #<tok>` and WORK_STATUS <n>/10 first). Payload `SCRIPT|JOB`; the attempt
# counter is DIR/chaos-<sha1_hex(payload)>, shared with pyworker.py; texts end with the
# attempt's token `pl<pid>-<n>-<4 hex>`; each attempt appends its "start" and "end" JSON
# lines to DIR/chaos.log ("uniq" is null: a GRAB_JOB worker never learns the unique; `t` is
# CLOCK_MONOTONIC, comparable with Python's time.monotonic()). The die texts end with a
# newline (so Perl adds no " at FILE line N"), which the end record keeps.
# The status goes out with Gearman::Job's set_status: Gearman::Worker 2.004's
# send_work_status passes only the numerator to _job_request, so its WORK_STATUS lacks the
# denominator field; gearmand 1.1.20 then reads the next packet (the WORK_COMPLETE) as that
# field, the worker's GRAB_JOB goes unanswered, the library drops the connection after 0.5 s
# and gearmand requeues the job: it runs again every 0.5 s and never completes.
#
# --timeout FUNCTION=VALUE (repeatable) registers FUNCTION with a timeout:
# register_function($name, $timeout, $sub), so Gearman::Worker sends CAN_DO_TIMEOUT
# `FUNCTION\0VALUE` instead of CAN_DO. VALUE goes out verbatim; gearmand 1.1.20 reads it
# as milliseconds and raises anything under 1000 to 1000, so "30" fires after one second
# ("1500" after 1.5 s; "0" sets no timer). When it fires gearmand silently requeues the
# job; this worker's late result then gets ERROR JOB_NOT_FOUND, which kills it as above.
# Gearman::Server instead takes the value as seconds, fails the job (WORK_FAIL to its
# clients) and accepts the late result silently.
# There is no `unique` function: a GRAB_JOB worker never learns the unique id.
#
# Ready signal: after registering (SET_CLIENT_ID + CAN_DO per function, sent synchronously
# by register_function) it sends one ECHO_REQ and reads the ECHO_RES, which proves gearmand
# processed the registration, then prints "ready". --no-echo skips the ECHO_REQ and prints
# "ready" once the registration was written. SIGTERM exits 0.
use strict;
use warnings;

use Digest::SHA qw(sha1_hex);
use Fcntl qw(O_WRONLY O_APPEND O_CREAT SEEK_CUR);
use File::Temp qw(tempdir);
use FindBin ();
use lib $FindBin::Bin;
use Getopt::Long qw(GetOptions);
use TlsJobServer ();
use IO::Handle;
use JSON::PP ();
use Time::HiRes qw(sleep time clock_gettime CLOCK_MONOTONIC);
use Gearman::Worker;
use Gearman::Util;

my $BLOCK_TIMEOUT_S = 60;
my $BLOCK_POLL_S    = 0.01;
my $JSON            = JSON::PP->new->canonical;
my $chaos_attempts  = 0;

my $USAGE = "usage: $0 HOST:PORT [--client-id ID] [--no-echo] [--state-dir DIR]"
    . " [--timeout FUNCTION=VALUE]... [--chaos] [--tls [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]]\n";
my ($client_id, $no_echo, $state_dir, $chaos, $tls, $tls_ca, $tls_cert, $tls_key);
my %timeouts;
GetOptions(
    "client-id=s" => \$client_id,
    "no-echo"     => \$no_echo,
    "state-dir=s" => \$state_dir,
    "timeout=s"   => \%timeouts,
    "chaos"       => \$chaos,
    "tls"         => \$tls,
    "tls-ca=s"    => \$tls_ca,
    "tls-cert=s"  => \$tls_cert,
    "tls-key=s"   => \$tls_key,
) or die $USAGE;
my $address = shift @ARGV or die $USAGE;
my $job_server = TlsJobServer::job_server($address, $tls, $tls_ca, $tls_cert, $tls_key);
$state_dir //= tempdir("perlworker-state-XXXXXX", TMPDIR => 1, CLEANUP => 1);
-d $state_dir or mkdir $state_dir or die "worker.pl: mkdir $state_dir: $!\n";

$SIG{TERM} = sub { exit 0 };
STDOUT->autoflush(1);

my $worker = Gearman::Worker->new(
    job_servers => [$job_server],
    (defined $client_id ? (client_id => $client_id) : ()),
);

my %functions = (
    reverse => sub { return scalar reverse $_[0]->arg },
    echo    => sub { return $_[0]->arg },
    block   => \&do_block,
    flaky   => \&do_flaky,
    flaky_db => \&do_flaky_db,
    unregister => sub { $worker->unregister_function($_[0]->arg); return "unregistered" },
    die_plain  => sub { die "boom: unmarked\n" },
    ($chaos ? (chaos => \&do_chaos, chaos_fail => \&do_chaos) : ()),
);

for my $name (sort keys %timeouts) {
    exists $functions{$name} or die "worker.pl: --timeout for unknown function $name\n";
}

for my $name (sort keys %functions) {
    my @timeout = exists $timeouts{$name} ? ($timeouts{$name}) : ();
    $worker->register_function($name, @timeout, $functions{$name})
        or die "worker.pl: registering $name at $address failed\n";
}

unless ($no_echo) {
    # The socket register_function just used (and that work() will reuse).
    my $sock = $worker->_get_js_sock($worker->job_servers)
        or die "worker.pl: no connection to $address\n";
    my $req = Gearman::Util::pack_req_command("echo_req", "perlworker-ready");
    Gearman::Util::send_req($sock, \$req) or die "worker.pl: ECHO_REQ failed\n";
    Gearman::Util::wait_for_readability($sock->fileno, 10)
        or die "worker.pl: no ECHO_RES within 10 s\n";
    my $err;
    my $res = Gearman::Util::read_res_packet($sock, \$err)
        or die "worker.pl: reading ECHO_RES failed: " . ($err // "?") . "\n";
    $res->{type} eq "echo_res"
        or die "worker.pl: expected echo_res, got $res->{type}\n";
}
print "ready\n";

$worker->work while 1;

sub do_block {
    my ($job) = @_;
    my $path = $job->arg;
    open(my $fh, '>', "$path.started.tmp") or die "open $path.started.tmp: $!";
    binmode $fh;
    print {$fh} $job->handle;
    close $fh or die "close: $!";
    rename("$path.started.tmp", "$path.started") or die "rename: $!";  # atomic for readers
    my $deadline = time + $BLOCK_TIMEOUT_S;
    until (-e $path) {
        return undef if time >= $deadline;
        sleep $BLOCK_POLL_S;
    }
    return "unblocked";
}

# Append one byte to $path with a single O_APPEND write; the offset after it is the file's
# size right after our write, even with other processes appending: the attempt number.
sub next_attempt {
    my ($path) = @_;
    sysopen(my $fh, $path, O_WRONLY | O_APPEND | O_CREAT, 0644) or die "open $path: $!";
    defined syswrite($fh, "x") or die "write $path: $!";
    my $attempt = sysseek($fh, 0, SEEK_CUR) or die "seek $path: $!";
    close $fh;
    return $attempt + 0;  # sysseek returns "0 but true" for 0
}

sub do_flaky {
    my ($job) = @_;
    my $payload = $job->arg;
    my ($wanted) = $payload =~ /\A(\d+):/ or die "payload is not N:rest\n";
    my $attempt = next_attempt("$state_dir/flaky-" . sha1_hex($payload));
    die "RETRY: transient failure $attempt\n" if $attempt <= $wanted;
    return "ok after $attempt";
}

sub do_flaky_db {
    my ($job) = @_;
    my $payload = $job->arg;
    my ($wanted) = $payload =~ /\A(\d+):/ or die "payload is not N:rest\n";
    my $attempt = next_attempt("$state_dir/flaky-" . sha1_hex($payload));
    die "DBD::mysql::st execute failed: Deadlock found when trying to get lock; try restarting transaction"
        if $attempt <= $wanted;
    return "ok after $attempt";
}


# One chaos.log line, a single O_APPEND write, so lines of several workers never interleave.
sub chaos_record {
    my ($record) = @_;
    my $line = $JSON->encode($record) . "\n";
    sysopen(my $fh, "$state_dir/chaos.log", O_WRONLY | O_APPEND | O_CREAT, 0644)
        or die "open chaos.log: $!";
    defined syswrite($fh, $line) or die "write chaos.log: $!";
    close $fh;
}

sub chaos_end {
    my ($token, $out, $data) = @_;
    chaos_record({e => "end", t => clock_gettime(CLOCK_MONOTONIC) + 0, tok => $token,
                  out => $out, data => $data});
    return $data;
}

sub do_chaos {
    my ($job) = @_;
    my $payload = $job->arg;
    my ($script, $job_id) = split /\|/, $payload, 2;
    my $attempt = next_attempt("$state_dir/chaos-" . sha1_hex($payload));
    my @actions = defined $job_id ? map { s/^\s+|\s+$//gr } split(/,/, $script, -1) : ();
    my $action = (@actions && !grep { $_ eq "" } @actions)
        ? $actions[($attempt < @actions ? $attempt : scalar @actions) - 1] : "?";
    $chaos_attempts++;
    my $token = sprintf("pl%d-%d-%04x", $$, $chaos_attempts, int(rand(65536)));
    chaos_record({
        e => "start", t => clock_gettime(CLOCK_MONOTONIC) + 0, lib => "pl", pid => $$ + 0,
        fn => $job->{func}, job => $job_id // "", uniq => undef, handle => $job->handle,
        n => $attempt + 0, act => $action, tok => $token,
    });
    my $tail = "$attempt #$token";
    if ($action =~ s/^stream\+//) {
        $worker->send_work_data($job, "data $tail");
        $job->set_status($attempt, 10);  # not $worker->send_work_status: see the top
    }
    return chaos_end($token, "complete", "ok after $tail") if $action eq "ok";
    if ($action =~ /\Asleep=([0-9.]+)\z/) {
        sleep $1;
        return chaos_end($token, "complete", "ok after $tail");
    }
    my %exceptions = (retry => "RETRY: scripted ", fatal => "FATAL: scripted ", plain => "boom ");
    my $exception = $exceptions{$action};
    $exception = "RETRY after=$1: scripted " if $action =~ /\Aafter=([0-9.]+)\z/;
    die chaos_end($token, "exception", "$exception$tail\n") if defined $exception;
    chaos_end($token, "fail", "");
    return undef;  # Gearman::Worker sends a plain WORK_FAIL
}
